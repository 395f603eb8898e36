"""Channels-last vs the usual memory layout for the passes neuroscribe makes (training steps, and the inference
passes of ablate/evaluate), measured side by side in one run, alternating, on the same batch:

    python benchmarks/layout_speed.py [--arch resnet18] [--res 64] [--batch 128] [--repeats 5]

Prints the median seconds per batch of each and the ratio usual / channels-last (> 1: channels-last is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from neuroscribe.models import channels_last, to_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(a.arch, num_classes=10)
    x, y = torch.randn(a.batch, 3, a.res, a.res), torch.randint(0, 10, (a.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step(on: bool) -> float:
        with channels_last(model, on) as layout:
            model.train()
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(to_layout(x, layout)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return time.perf_counter() - t

    @torch.no_grad()
    def infer(on: bool) -> float:
        with channels_last(model, on) as layout:
            model.eval()
            t = time.perf_counter()
            model(to_layout(x, layout))
            return time.perf_counter() - t

    print(f"{a.arch}, batch {a.batch} at {a.res} px, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, fn in (("training step", train_step), ("inference", infer)):
        fn(False), fn(True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.repeats):
            for on in (False, True):
                times[on].append(fn(on))
        usual, last = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name}: usual {usual:.3f} s, channels-last {last:.3f} s, ratio {usual / last:.2f}")


if __name__ == "__main__":
    main()
