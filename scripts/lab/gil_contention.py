"""How much a host-bound denoising step slows down beside the lab's other Python, and what the interpreter's switch
interval changes (a simulation on the CPU, no model).

    python -m scripts.lab.gil_contention

The pipeline's thread: steps of ~60 small torch ops (each releases the GIL in the op and takes it back) and 2 ms of
waiting with the GIL free (the device's part): a short speculative step, a CUDA graph replay, issues little but
must get the GIL back quickly each time. The lab's other threads: ~30 ms of Python every 300 ms (a streamed update's
figures and Gradio's processing, as measured for issue 13). On the H100 (run 3, `scripts/bench/gpu_lab.sh`) SpeCa's
and SpecDiff's denoiser took 9-10 % longer in the lab than in the bare call; this simulation gives about the same
with CPython's default switch interval (5 ms: a thread that wants the GIL waits up to that long for a busy holder)
and +2-6 % with 1 ms, the lab's setting (`app.SWITCH_INTERVAL_S`), over 5 runs on a 2-core CPU.
"""

from __future__ import annotations

import sys
import threading
import time

import torch


def _consumer(stop: threading.Event, busy_s: float, every_s: float) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < busy_s:
            sum(range(300))
        stop.wait(every_s - busy_s)


def _steps(n: int, ops: int, device_s: float) -> float:
    x = torch.zeros(64)
    t0 = time.perf_counter()
    for _ in range(n):
        for _ in range(ops):
            torch.add(x, 1.0)
        time.sleep(device_s)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    torch.set_num_threads(1)
    default = sys.getswitchinterval()
    try:
        for interval in (0.005, 0.001):
            sys.setswitchinterval(interval)
            alone = _steps(400, 60, 0.002)
            stop = threading.Event()
            th = threading.Thread(target=_consumer, args=(stop, 0.030, 0.300))
            th.start()
            beside = _steps(400, 60, 0.002)
            stop.set()
            th.join()
            print(f"switch interval {interval * 1e3:.0f} ms: a step {alone:.2f} ms alone, {beside:.2f} ms beside the "
                  f"lab's Python (+{(beside / alone - 1) * 100:.1f} %)")
    finally:
        sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
