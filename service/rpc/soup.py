"""SoupService: living soups (``merge.soups.folder``) as server resources; thin protobuf <-> library translation.

Create / add / remove / build are jobs of kind "soup" (:mod:`service.jobs.kinds.soup`; watched with
JobService); GetSoup reads the manifest (under the soup's shared lock) in a server thread.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from google.protobuf import json_format

from service._proto.weightsmith.v1 import soup_service_pb2 as spb
from service._proto.weightsmith.v1 import soup_service_pb2_grpc as spb_grpc
from service.jobs.manager import JobManager
from service.jobs.store import JobRecord
from service.rpc.convert import handle_errors
from service.rpc.jobs import CONVERT, job_pb

SOUP_SERVICE = spb.DESCRIPTOR.services_by_name["SoupService"].full_name


def _member_pb(m: dict[str, Any] | None) -> spb.SoupMember | None:
    if not m:
        return None
    return spb.SoupMember(
        id=str(m.get("id", "")),
        weight=float(m.get("weight", 1.0)),
        path=str(m.get("path", "")),
        hash=str(m.get("hash", "")),
        added=str(m.get("added", "")),
        status=str(m.get("status", "")),
    )


def soup_pb(show: dict[str, Any], ref: str) -> spb.Soup:
    """``merge.soups.folder.Soup.show()`` as a message."""
    msg = spb.Soup(
        path=show["path"],
        ref=ref,
        display_name=show.get("name") or "",
        kind=show.get("kind") or "",
        dtype=show.get("dtype") or "",
        soup_id=show.get("soup_id") or "",
        members=[_member_pb(m) for m in show.get("members", [])],
        total_weight=float(show.get("total_weight") or 0.0),
        summed=list(show.get("summed") or []),
        copied=list(show.get("copied") or []),
        history=[
            spb.SoupEvent(
                time=str(e.get("time", "")),
                op=str(e.get("op", "")),
                member=str(e.get("member") or ""),
                members=[str(x) for x in e.get("members", [])],
                soup_id=str(e.get("soup_id", "")),
            )
            for e in show.get("history", [])
        ],
        leftovers=list(show.get("leftovers") or []),
    )
    base = _member_pb(show.get("base"))
    if base is not None:
        msg.base.CopyFrom(base)
    return msg


def _ref(rec: JobRecord) -> str:
    """How clients name the soup a job worked on: its creating job for server-kept soups, else the path."""
    if rec.spec.get("op") == "create":
        return f"job://{rec.id}"
    return rec.spec.get("ref") or rec.spec.get("soup", "")


def _result(rec: JobRecord) -> spb.SoupResult:
    r = rec.result or {}
    op = r.get("operation", "")
    return spb.SoupResult(
        operation=op,
        soup=soup_pb(r["soup"], _ref(rec)) if r.get("soup") else None,
        output_path=r.get("out_dir", "") if op == "build" else "",
        output_ref=f"job://{rec.id}" if op == "build" else "",
        seconds=float(r.get("seconds", 0.0)),
    )


def _spec(rec: JobRecord) -> Any:
    s, op = rec.spec, rec.spec.get("op")
    soup = s.get("ref") or s.get("soup", "")
    if op == "create":
        return spb.CreateSoupRequest(
            request_id=rec.request_id,
            soup=rec.output_path,
            members=[
                spb.SoupMemberSpec(model=m["path"], id=m["id"], weight=m["weight"]) for m in s["members"]
            ],
            base=s.get("base") or "",
            dtype=s.get("dtype") or "",
            display_name=s.get("name") or "",
        )
    if op == "add":
        m = s["member"]
        return spb.AddSoupMemberRequest(
            request_id=rec.request_id,
            soup=soup,
            member=spb.SoupMemberSpec(model=m["path"], id=m["id"], weight=m["weight"]),
        )
    if op == "remove":
        return spb.RemoveSoupMemberRequest(request_id=rec.request_id, soup=soup, member_id=s["member_id"])
    return spb.BuildSoupRequest(
        request_id=rec.request_id, soup=soup, output_path=rec.output_path, overwrite=rec.overwrite,
        shard_size=int(s.get("shard_size", 0)),
    )  # fmt: skip


CONVERT["soup"] = (_spec, _result)


class SoupServicer(spb_grpc.SoupServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.m = manager

    async def _create(self, op: str, request: Any) -> Any:
        from service.jobs.kinds import soup as kind_soup

        req = json_format.MessageToDict(request, preserving_proto_field_name=True)
        req.pop("request_id", None)
        prev, req_hash = self.m.previous_request(request.request_id, {"kind": "soup", "op": op, **req})
        if prev is not None:
            return job_pb(prev)
        job_id = uuid.uuid4().hex
        sub = await kind_soup.admit(self.m, op, req, job_id)
        if op != "create":
            sub.spec["ref"] = req.get("soup", "")
        return job_pb(await self.m.submit(job_id, sub, request.request_id, req_hash))

    @handle_errors()
    async def CreateSoup(self, request: spb.CreateSoupRequest, context: Any) -> spb.CreateSoupResponse:
        return spb.CreateSoupResponse(job=await self._create("create", request))

    @handle_errors()
    async def AddSoupMember(
        self, request: spb.AddSoupMemberRequest, context: Any
    ) -> spb.AddSoupMemberResponse:
        return spb.AddSoupMemberResponse(job=await self._create("add", request))

    @handle_errors()
    async def RemoveSoupMember(
        self, request: spb.RemoveSoupMemberRequest, context: Any
    ) -> spb.RemoveSoupMemberResponse:
        return spb.RemoveSoupMemberResponse(job=await self._create("remove", request))

    @handle_errors()
    async def BuildSoup(self, request: spb.BuildSoupRequest, context: Any) -> spb.BuildSoupResponse:
        return spb.BuildSoupResponse(job=await self._create("build", request))

    @handle_errors("soup")
    async def GetSoup(self, request: spb.GetSoupRequest, context: Any) -> spb.GetSoupResponse:
        from merge.soups.folder import Soup
        from service.jobs.kinds.soup import soup_folder

        path = await asyncio.to_thread(soup_folder, self.m, request.soup)
        show = await asyncio.to_thread(lambda: Soup(path).show(verify=request.verify))
        return spb.GetSoupResponse(soup=soup_pb(show, request.soup))


def add_servicers(manager: JobManager, server: Any) -> list[str]:
    spb_grpc.add_SoupServiceServicer_to_server(SoupServicer(manager), server)
    return [SOUP_SERVICE]
