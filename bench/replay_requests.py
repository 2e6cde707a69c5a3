"""Replays the requests that once took the server down (issue 28) against `safeprobe serve`
under an address-space cap, and prints each request's answer and what it did to the server's
peak resident memory.

    python3 bench/replay_requests.py                        # the release binary in the shared target folder
    python3 bench/replay_requests.py --safeprobe PATH --as-limit 4G > table.md

Standard library only; Linux (reads /proc). The server runs on the CPU with the demo model, a
fresh data folder and the test fixtures' data, under `prlimit --as` (the cap each of the old
crashes broke through). Before and after each request the server's VmHWM (its peak RSS so far)
is read; the table gives the growth each request caused. Jobs the server admits run in their
own process: their memory is not the server's, and the table says how each one ended.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "replay-token-1234"


def default_binary():
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/safeprobe-target"))
    return str(Path(target) / "release/safeprobe")


def vm_hwm(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def size_in_bytes(text):
    """ "4G" -> 4294967296 (prlimit itself reads plain bytes only: "4G" made it 4 bytes)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class Server:
    def __init__(self, binary, as_limit, data_dir, datasets):
        command = ["prlimit", f"--as={size_in_bytes(as_limit)}", binary, "serve", "--bind", "127.0.0.1:0",
                   "--device", "cpu", "--token", TOKEN, "--data-dir", str(data_dir),
                   "--datasets", str(datasets)]
        self.log = open(Path(data_dir).parent / "server.log", "wb")
        # prlimit execs the server: its pid is the server's.
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log,
                                        env={**os.environ, "SAFEPROBE_HOME": str(data_dir) + "-home"})
        line = self.process.stdout.readline().decode()
        prefix = "safeprobe is serving on "
        if not line.startswith(prefix):
            raise RuntimeError(f"the server did not start: {line!r}")
        self.base = line[len(prefix):].strip().rstrip("/")

    def alive(self):
        return self.process.poll() is None

    def request(self, method, path, body=None, content_type="application/json", timeout=600):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return 0, f"no answer: {e}"

    def wait_job(self, job_id, timeout=900):
        started = time.time()
        while time.time() - started < timeout:
            code, text = self.request("GET", f"/api/jobs/{job_id}")
            if code != 200:
                return f"GET failed ({code})"
            job = json.loads(text)
            if job["status"] not in ("queued", "running"):
                return job["status"] + (f": {job['error'][:80]}" if job.get("error") else "")
            time.sleep(0.5)
        return "still running"

    def stop(self):
        self.process.kill()
        self.process.wait()
        self.log.close()


def train(patch=None, steps=2):
    config = {"train_data": "train.jsonl", "safety_data": "safety.jsonl", "method": "sap",
              "max_steps": steps, "batch_size": 2, "safety_batch_size": 2, "max_len": 64,
              "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}, "sap": {"temperature": 100.0}}
    for key, value in (patch or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return {"kind": "train", "config": config}


def multipart(path):
    boundary = "replay-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{Path(path).name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    return head + Path(path).read_bytes() + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def parallel(n, call):
    results = [None] * n

    def one(i):
        results[i] = call()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--safeprobe", default=default_binary())
    parser.add_argument("--as-limit", default="4G", help="prlimit --as for the server")
    parser.add_argument("--upload-mb", type=int, default=102)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="safeprobe-replay-"))
    data_dir = work / "data"
    datasets = work / "datasets"
    datasets.mkdir()
    for name in ("train.jsonl", "safety.jsonl"):
        (datasets / name).write_bytes((ROOT / "tests/fixtures/data" / name).read_bytes())
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"prompt": "x"}\n')
    (datasets / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    uploads = work / "records.jsonl"
    line = b'{"prompt": "2+2?", "response": "4"}\n'
    with open(uploads, "wb") as f:
        for _ in range(args.upload_mb * 1_000_000 // len(line)):
            f.write(line)

    server = Server(args.safeprobe, args.as_limit, data_dir, datasets)
    pid = server.process.pid
    server.request("GET", "/api/jobs")
    rows = []

    def measure(name, call):
        before = vm_hwm(pid)
        started = time.time()
        outcome = call()
        seconds = time.time() - started
        after = vm_hwm(pid) if server.alive() else before
        rows.append((name, outcome, before, after, seconds, server.alive()))
        print(f"{name}: {outcome} (+{(after - before) / 2**20:.1f} MiB)", file=sys.stderr)

    def job(request):
        code, text = server.request("POST", "/api/jobs", request)
        if code != 200:
            return f"{code} {json.loads(text)['error'][:110]}"
        return f"{code}, job ended {server.wait_job(json.loads(text)['id'])}"

    def answered(code_text):
        code, text = code_text
        try:
            text = json.loads(text).get("error", text)
        except (json.JSONDecodeError, AttributeError):
            pass
        return f"{code} {str(text)[:110]}"

    prompt_900k = "tell me a story about a cat. " * (900_000 // 29)
    prompt_20k = "x" * 20_000
    measure("train lora.r = 10^9", lambda: job(train({"lora": {"r": 1_000_000_000}})))
    measure("train batch_size = 10^6", lambda: job(train({"batch_size": 1_000_000})))
    measure("chat, 900 KB prompt", lambda: answered(server.request("POST", "/api/chat", {
        "messages": [{"role": "user", "content": prompt_900k}], "max_new_tokens": 8})))
    measure("chat, 20 000-character prompt", lambda: answered(server.request("POST", "/api/chat", {
        "messages": [{"role": "user", "content": prompt_20k}], "max_new_tokens": 8})))
    body, content_type = multipart(uploads)
    measure(f"upload, {args.upload_mb} MB of tiny JSONL records", lambda: answered(
        server.request("POST", "/api/datasets", body, content_type)))
    del body
    measure("compare max_new_tokens = 0", lambda: job(
        {"kind": "compare", "config": {"max_new_tokens": 0}}))
    measure('train device = "evil"', lambda: job(train({"device": "evil"})))
    measure("train sap.layers = [99]", lambda: job(train({"sap": {"layers": [99]}})))
    measure("train max_len = 0", lambda: job(train({"max_len": 0})))
    measure("a train job the server admits (2 steps)", lambda: job(train()))
    finished = max(j["id"] for j in json.loads(server.request("GET", "/api/jobs")[1]))
    measure("3 exports of one run at once", lambda: " ".join(
        str(code) for code, _ in parallel(3, lambda: server.request(
            "POST", f"/api/jobs/{finished}/export", {"dtype": "f32"}))))
    code, text = server.request("POST", "/api/jobs", train(steps=10_000))
    long_id = json.loads(text)["id"]
    while json.loads(server.request("GET", f"/api/jobs/{long_id}")[1]).get("last_step") is None:
        time.sleep(0.5)
    server.request("POST", f"/api/jobs/{long_id}/cancel", {})
    server.wait_job(long_id)
    measure("5 resumes of a cancelled job at once", lambda: " ".join(
        str(code) for code, _ in parallel(5, lambda: server.request(
            "POST", f"/api/jobs/{long_id}/resume", {}))))
    server.request("POST", f"/api/jobs/{long_id}/cancel", {})
    server.wait_job(long_id)
    measure("dataset list with a link out of the folder", lambda: "leak listed" if "leak" in
            server.request("GET", "/api/datasets")[1] else "200, link not listed")
    measure("pull revision ../../../../x", lambda: answered(server.request(
        "POST", "/api/models/pull", {"repo": "org/model", "revision": "../../../../x"})))
    alive = server.alive()
    server.stop()
    blank = subprocess.run([args.safeprobe, "serve", "--bind", "0.0.0.0:0", "--device", "cpu",
                            "--token", " ", "--data-dir", str(work / "blank")],
                           capture_output=True, text=True, timeout=60)

    print(f"safeprobe serve under prlimit --as={args.as_limit}, --device cpu, the demo model; "
          f"the server's peak RSS (VmHWM) before and after each request.\n")
    print("| request | answer | peak before (MiB) | peak after (MiB) | growth (MiB) | s | server up |")
    print("|---|---|---|---|---|---|---|")
    for name, outcome, before, after, seconds, up in rows:
        outcome = outcome.replace("|", "/").replace("\n", " ")
        print(f"| {name} | {outcome} | {before / 2**20:.0f} | {after / 2**20:.0f} | "
              f"{(after - before) / 2**20:.1f} | {seconds:.1f} | {'yes' if up else 'NO'} |")
    print(f"| serve --token \" \" --bind 0.0.0.0 | exit {blank.returncode}: "
          f"{blank.stderr.strip().splitlines()[-1][:110]} | | | | | |")
    print(f"\nServer still up after every request: {'yes' if alive else 'NO'}.")


if __name__ == "__main__":
    main()
