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
    #: base URL of the gateway's OpenAI-compatible API (through the edge in mesh mode)
    openai: str = ""
    #: the control plane (mTLS), mesh mode only
    control_plane: str = ""
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
        """A channel to "gateway", "registry" or "control-plane", as `identity` in mesh mode."""
        target = {"gateway": self.gateway, "registry": self.registry, "control-plane": self.control_plane}[service]
        if not self.mesh:
            return insecure_channel(target)
        ident = certs.identity(Path(self.certs_dir), identity, self.namespace)
        if service == "gateway":  # the edge: server-side TLS only, like any external client
            creds = grpc.ssl_channel_credentials(root_certificates=Path(ident.ca_path).read_bytes())
            name = "edge"
        else:
            creds, name = certs.channel_credentials(ident), service
        return grpc.aio.secure_channel(
            target, creds, options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)]
        )
