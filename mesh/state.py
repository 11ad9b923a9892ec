"""Where a running `servemesh up` can be reached, written to <home>/run/mesh.json.

The CLI reads it so `servemesh route ...`, `servemesh mesh status` and `servemesh
generate` dial the right addresses with the right credentials, in mesh and --no-mesh mode.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from mesh import certs
from services.common.client import CHANNEL_OPTIONS, insecure_channel


@dataclass(frozen=True)
class MeshState:
    #: True: services behind mTLS sidecars and an edge; False: direct plaintext (--no-mesh)
    mesh: bool
    #: where clients reach the gateway: the edge (TLS) in mesh mode, the gateway itself otherwise
    gateway: str
    #: the registry: its sidecar's inbound listener (mTLS) in mesh mode
    registry: str
    #: the retrieval service (its sidecar's inbound listener in mesh mode); "" = not running
    retrieval: str = ""
    #: base URL of the gateway's OpenAI-compatible API (through the edge in mesh mode)
    openai: str = ""
    #: the dev tenant's API key (a 0600 file) that gateway channels send; "" = auth is off
    api_key_file: str = ""
    #: the control plane (mTLS), mesh mode only
    control_plane: str = ""
    #: the rollout and SLO controller (mTLS in mesh mode, plaintext otherwise); "" = not running
    controller: str = ""
    #: the local CA's directory, mesh mode only
    certs_dir: str = ""
    namespace: str = "default"
    #: Envoy node id -> admin port
    envoys: dict[str, int] = field(default_factory=dict)

    def write(self, home: Path) -> Path:
        path = home / "run" / "mesh.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, home: Path) -> MeshState | None:
        path = home / "run" / "mesh.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    @staticmethod
    def remove(home: Path) -> None:
        (home / "run" / "mesh.json").unlink(missing_ok=True)

    def channel(self, service: str, identity: str = "cli") -> grpc.aio.Channel:
        """A channel to "gateway", "registry", "retrieval", "control-plane" or "controller", as `identity`
        in mesh mode."""
        targets = {
            "gateway": self.gateway,
            "registry": self.registry,
            "retrieval": self.retrieval,
            "control-plane": self.control_plane,
            "controller": self.controller,
        }
        target = targets[service]
        bearer = bearer_token(self.api_key()) if service == "gateway" and self.api_key_file else []
        if not self.mesh:
            return insecure_channel(target, interceptors=bearer)
        ident = certs.identity(Path(self.certs_dir), identity, self.namespace)
        if service == "gateway":  # the edge: server-side TLS only, like any external client
            creds = grpc.ssl_channel_credentials(root_certificates=Path(ident.ca_path).read_bytes())
            name = "edge"
        else:
            creds, name = certs.channel_credentials(ident), service
        return grpc.aio.secure_channel(
            target, creds, options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)], interceptors=bearer
        )

    def endpoint_channel(self, endpoint: str, service: str, identity: str = "cli") -> grpc.aio.Channel:
        """A channel to one deployment's endpoint (its sidecar's inbound listener) over mTLS as `identity`,
        or plaintext in --no-mesh mode; gateway calls carry the dev tenant's API key, as `channel`'s do."""
        bearer = bearer_token(self.api_key()) if service == "gateway" and self.api_key_file else []
        if not self.mesh:
            return insecure_channel(endpoint, interceptors=bearer)
        ident = certs.identity(Path(self.certs_dir), identity, self.namespace)
        return grpc.aio.secure_channel(
            endpoint,
            certs.channel_credentials(ident),
            # the sidecar presents its service's identity, whose certificate names the service
            options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", service)],
            interceptors=bearer,
        )

    def api_key(self) -> str:
        return Path(self.api_key_file).read_text().strip() if self.api_key_file else ""


class _Bearer:
    def __init__(self, key: str) -> None:
        self._entry = ("authorization", f"Bearer {key}")

    def _with_key(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=grpc.aio.Metadata(*(details.metadata or ()), self._entry),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


class _UnaryBearer(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_key(details), request)


class _StreamBearer(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_key(details), request)


def bearer_token(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors sending `authorization: Bearer <key>` on every unary and server-streaming call.

    Two objects, not one class with both bases: a channel files each interceptor under the first
    kind it is an instance of, so one object would never see the streaming calls.
    """
    return [_UnaryBearer(key), _StreamBearer(key)]
