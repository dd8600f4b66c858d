"""Front door overhead benchmark: run by hand as root, prints figures (CI does not run it).

    python bench/frontdoor.py [--rounds 15] [--max-tokens 128] [--threads 1]

One real llama-server (Debian sid, testbed/llama_server.py) serving SmolLM2-135M-Instruct
(testbed/real_model.py) with an API key, and in front of it the front door the tests run
(testbed/frontdoor.py: Debian's nginx with the frontdoor.conf the deploy writes, TLS with a
certificate from backchat's CA). Each round sends the same streamed chat completion
(``stream: true``, temperature 0, ``max_tokens`` tokens, end-of-sequence ignored, prompt
cache off so every request evaluates its prompt) four ways, in a rotating order: straight
to llama-server and through the door, each on a new connection per request (the door's
TLS handshake included) and on one kept-alive connection. Per request: time to first token
(request sent -> first SSE event with text) and tokens/s (events with text after the first
/ time from the first to the last), and the CPU time nginx and llama-server used for it.
Figures: medians per way, door/direct ratios as the median of each round's ratio, and the
door's CPU per answer beside the model's (which the machine's load does not skew). See
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from testbed import frontdoor as fd  # noqa: E402
from testbed.llama_server import LlamaServer  # noqa: E402
from testbed.real_model import real_model  # noqa: E402
from testbed.sandbox import proc_stat  # noqa: E402

KEY = "sk-bench-frontdoor-0123456789"
QUESTION = "Who was the president of the United States in 1997?"
WARMUP = 2
TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its running descendants."""
    try:
        fields = proc_stat(pid)
        children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]
    except FileNotFoundError:  # gone meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK + sum(tree_cpu(child) for child in children)


def completion(client: httpx.Client, base_url: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, tokens/s after it, tokens) of one streamed answer."""
    body = {"model": "gpt-3.5-turbo", "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "ignore_eos": True, "cache_prompt": False, "messages": [{"role": "user", "content": QUESTION}]}
    started = time.perf_counter()
    arrivals = []
    with client.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {KEY}"}) as response:
        if response.status_code != 200:
            raise SystemExit(f"{base_url} answered {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[len("data: "):]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                arrivals.append(time.perf_counter())
    if len(arrivals) < 2:
        raise SystemExit(f"{base_url}: {len(arrivals)} tokens streamed")
    return arrivals[0] - started, (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), len(arrivals)


class Way:
    """One way to the model: a base URL, the CA to trust, a new or a kept-alive connection."""

    def __init__(self, name: str, base_url: str, verify, keep_alive: bool) -> None:
        self.name, self.base_url, self.verify, self.keep_alive = name, base_url, verify, keep_alive
        self.client = httpx.Client(verify=verify, timeout=300) if keep_alive else None
        self.ttft: list[float] = []
        self.rate: list[float] = []
        self.tokens: set[int] = set()
        self.reconnects = 0
        self.cpu = {"door": 0.0, "model": 0.0}

    def run(self, max_tokens: int, pids: dict[str, int], record: bool = True) -> None:
        before = {name: tree_cpu(pid) for name, pid in pids.items()}
        if self.client is not None:
            try:
                figures = completion(self.client, self.base_url, max_tokens)
            except httpx.RemoteProtocolError:
                # llama-server closes a connection idle for 5 s (cpp-httplib's keep-alive
                # timeout) and the client may reuse it in that instant: once more, anew.
                self.reconnects += 1
                figures = completion(self.client, self.base_url, max_tokens)
        else:
            with httpx.Client(verify=self.verify, timeout=300) as client:
                figures = completion(client, self.base_url, max_tokens)
        if record:
            for name, pid in pids.items():
                self.cpu[name] += tree_cpu(pid) - before[name]
            self.ttft.append(figures[0])
            self.rate.append(figures[1])
            self.tokens.add(figures[2])

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def paired(door: Way, direct: Way, attribute: str) -> float:
    """The median over rounds of door/direct (rounds are interleaved, so drift cancels)."""
    return statistics.median(a / b for a, b in zip(getattr(door, attribute), getattr(direct, attribute)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="llama-server's --threads")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (llama-server runs chrooted in a Debian sid root)")
    why = fd.missing_requirements()
    if why:
        raise SystemExit(why)

    workdir = Path(tempfile.mkdtemp(prefix="backchat-bench-frontdoor-", dir="/var/tmp"))
    print(f"work directory (nginx's config and log): {workdir}")
    model = real_model()
    print(f"model: {model.path.name}, {model.size:,} bytes; llama-server --threads {args.threads}; "
          f"{args.rounds} rounds of {args.max_tokens} tokens", flush=True)
    with LlamaServer(model.path, alias="gpt-3.5-turbo", api_key=KEY,
                     extra_args=["--chat-template", "chatml", "--threads", str(args.threads)]) as server:
        with fd.llama_door(workdir, f"127.0.0.1:{server.port}", KEY) as door:
            ways = [
                Way("direct, new connection", server.url, True, keep_alive=False),
                Way("door, new connection", door.url, door.trust, keep_alive=False),
                Way("direct, kept alive", server.url, True, keep_alive=True),
                Way("door, kept alive", door.url, door.trust, keep_alive=True),
            ]
            pids = {"door": door.proc.pid, "model": server.proc.pid}
            try:
                for way in ways:
                    for _ in range(WARMUP):
                        way.run(args.max_tokens, pids, record=False)
                for number in range(args.rounds):
                    shift = number % len(ways)
                    for way in ways[shift:] + ways[:shift]:
                        way.run(args.max_tokens, pids)
                    print(f"  round {number + 1}/{args.rounds}", flush=True)
            finally:
                for way in ways:
                    way.close()

    print("\nmedians per way:")
    for way in ways:
        print(f"  {way.name:24} time to first token {statistics.median(way.ttft) * 1000:7.1f} ms   "
              f"{statistics.median(way.rate):6.1f} tokens/s   (tokens per answer: {sorted(way.tokens)}"
              + (f", reconnects: {way.reconnects}" if way.reconnects else "") + ")")
    print("\ndoor / direct (median of the rounds' ratios):")
    for door, direct, label in ((ways[1], ways[0], "new connection"), (ways[3], ways[2], "kept alive")):
        extra = statistics.median(a - b for a, b in zip(door.ttft, direct.ttft)) * 1000
        print(f"  {label:16} time to first token x{paired(door, direct, 'ttft'):.3f} ({extra:+.1f} ms)   "
              f"tokens/s x{paired(door, direct, 'rate'):.3f}")
    print("\nCPU per answer, nginx (the door) and llama-server (the model):")
    for way in ways:
        door_ms, model_ms = (way.cpu[name] / args.rounds * 1000 for name in ("door", "model"))
        print(f"  {way.name:24} door {door_ms:6.1f} ms   model {model_ms:7.1f} ms   door/model {door_ms / model_ms:.4f}")


if __name__ == "__main__":
    main()
