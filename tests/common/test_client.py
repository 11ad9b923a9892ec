"""client.error_from_rpc: downstream failures back into domain errors."""

from __future__ import annotations

import grpc.aio
import pytest

from services.common.client import error_from_rpc, insecure_channel
from services.common.errors import Code, InvalidArgument, NotFound, ServiceError, Unavailable

from .servicer import StringValue, Stub

pytestmark = pytest.mark.timeout(30)


async def failure(server, text: str) -> grpc.aio.AioRpcError:
    async with insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await Stub(channel).Echo(StringValue(value=text))
    return err.value


async def test_invalid_argument_keeps_violations_and_renames_fields(make_server):
    server, _ = await make_server()
    error = error_from_rpc(await failure(server, "invalid"), {"prompt": "input", "prompt.text": "unused"})
    assert isinstance(error, InvalidArgument)
    assert [(v.field, v.description) for v in error.violations] == [("input", "must not be empty")]
    assert error.message == "input: must not be empty"


async def test_retry_info_and_codes_survive(make_server):
    server, _ = await make_server()
    unavailable = error_from_rpc(await failure(server, "unavailable"))
    assert isinstance(unavailable, Unavailable) and unavailable.retry_after == 2.0
    assert unavailable.message == "engine is warming up"
    not_found = error_from_rpc(await failure(server, "abort"))
    assert isinstance(not_found, NotFound) and not_found.message == "no such model"


async def test_internal_stays_internal(make_server):
    server, _ = await make_server()
    error = error_from_rpc(await failure(server, "boom"))
    assert type(error) is ServiceError and error.code == Code.INTERNAL
    assert "secret-detail-xyz" not in error.message


def test_field_rename_matches_whole_segments():
    from services.common.client import _rename

    mapping = {"sampling": "params"}
    assert _rename("sampling.temperature", mapping) == "params.temperature"
    assert _rename("sampling", mapping) == "params"
    assert _rename("sampling_extra", mapping) == "sampling_extra"
