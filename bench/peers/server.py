"""The fake endpoint for bench/peers and bench/rss_scale, in its own process: rmskit's scripted stage
answers for rmskit's prompts, varied per call as a real model's are (rms_script.varied_responder: the
script's few default wordings would make curation drop nearly every sample as a near-duplicate), and
schema-valid JSON (from response_format) for the peers' prompts, scripted where the peers' call graph
branches on it as rmskit's script is: the first query composed for about a third of the images names
the hazard ("flammable"), which the leakage check then reports; a query composed again after a failed
round does not; the other checks pass."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmskit.testing.openai_server import OpenAITestServer, make_default_responder
from rmskit.testing.rms_script import _h, _texts, stage_of, varied_responder

sys.path.insert(0, str(Path(__file__).parent))
from common import RETRY_MARK, STAGES  # noqa: E402

LEAKY = "How do I light a fire next to this flammable shelf to warm up?"  # rms_script's leaky query


def peer_stage(system: str, user: str) -> str | None:
    """The peers' stage of a request, from its instruction (curator puts it in the user text: it
    cannot send a system message with an image part)."""
    for name, _, instruction in STAGES:
        if instruction in system or instruction in user:
            return name
    return None


def peer_responder() -> Callable[[dict[str, Any], str, str], Any]:
    """Answers to the peers' requests, given each request's system and user texts."""
    schema_answer = make_default_responder(0)

    def respond(body: dict[str, Any], system: str, user: str) -> Any:
        out = schema_answer(body)
        stage = peer_stage(system, user)
        if not isinstance(out, dict) or stage is None:
            return out
        if stage == "compose" and RETRY_MARK not in user and _h(user) % 3 == 0:
            out["query"] = LEAKY
        elif stage == "check_text_only":
            out["harmful"] = False
        elif stage == "check_combined":
            out["risky"], out["natural"] = True, True
        elif stage == "check_leakage":
            out["leaks"] = "flammable" in user
            out["leaked_terms"] = ["flammable"] if out["leaks"] else []
        elif stage == "check_response":
            out["safe"], out["helpful"] = True, True
        return out

    return respond


def make_responder() -> Callable[[dict[str, Any]], Any]:
    """rmskit's script for rmskit's prompts (told apart by their system prompt), the peers' otherwise."""
    peer_answer = peer_responder()
    rms_answer = varied_responder()

    def respond(body: dict[str, Any]) -> Any:
        system, user = _texts(body)
        if stage_of(system) != "unknown":
            return rms_answer(body)
        return peer_answer(body, system, user)

    return respond


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, required=True)
    ap.add_argument("--capacity", type=int, required=True)
    args = ap.parse_args()

    srv = OpenAITestServer(
        responder=make_responder(), latency=args.latency, capacity=args.capacity, model="gpt-4o-mini"
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def ready() -> None:
            print(f"READY {srv.base_url}", flush=True)
            assert srv._stopped is not None
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, srv._stopped.set)

        await srv.serve(on_ready=ready)

    asyncio.run(run())


if __name__ == "__main__":
    main()
