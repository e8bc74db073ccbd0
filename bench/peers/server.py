"""The fake endpoint for bench/peers and bench/rss_scale, in its own process: rmskit's scripted stage
answers for rmskit's prompts, varied per call as a real model's are (rms_script.varied_responder: the
script's few default wordings would make curation drop nearly every sample as a near-duplicate), and
any schema-valid JSON (from response_format) for the peers' prompts."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from rmskit.testing.openai_server import OpenAITestServer, make_default_responder
from rmskit.testing.rms_script import _texts, stage_of, varied_responder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, required=True)
    ap.add_argument("--capacity", type=int, required=True)
    args = ap.parse_args()
    schema_answer = make_default_responder(0)
    rms_answer = varied_responder()

    def respond(body: dict[str, Any]) -> Any:
        if stage_of(_texts(body)[0]) != "unknown":
            return rms_answer(body)
        return schema_answer(body)

    srv = OpenAITestServer(
        responder=respond, latency=args.latency, capacity=args.capacity, model="gpt-4o-mini"
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
