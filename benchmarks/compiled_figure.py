"""What a reconstruction figure costs a compiled model: run eagerly vs compiled a second time.

    OMP_NUM_THREADS=1 python benchmarks/compiled_figure.py --model mae_vit_tiny_patch4 --rounds 2

Each measurement is a fresh process (fresh dynamo state, its own empty inductor cache): the model
is compiled in place as `train.compile=true` does, takes two training steps (the training graph
is compiled there), then draws one figure's reconstruction of 8 images, timed in CPU seconds.
"eager" is `viz.reconstruction_panels` as maescale runs it (`force_eager`); "recompiled" calls
the same panels without it, which makes dynamo compile an inference graph for the no-grad call.
Variants alternate, round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "recompiled")


def measure(model_name: str, variant: str) -> dict:
    import torch

    from maescale.models import build_model
    from maescale.viz import IMAGENET_DISPLAY, _panels, reconstruction_panels

    torch.manual_seed(0)
    model = build_model(model_name)
    model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(8, model.in_chans, *model.img_size)  # img_size is (H, W)
    start = time.process_time()
    for _ in range(2):
        loss, _, _ = model(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    train_s = time.process_time() - start
    start = time.process_time()
    if variant == "eager":
        reconstruction_panels(model, images)
    else:
        model.eval()
        with torch.no_grad():
            _panels(model, images, 0, IMAGENET_DISPLAY)
    return {"variant": variant, "train_2_steps_s": train_s, "figure_s": time.process_time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mae_vit_tiny_patch4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.child)))
        return
    rows = []
    for round_ in range(args.rounds):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
                done = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", variant],
                                      env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}: CPU seconds, median of {args.rounds} rounds")
    print("| variant | 2 training steps (compile included) | first figure |")
    print("|---|---|---|")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        train = statistics.median(r["train_2_steps_s"] for r in mine)
        figure = statistics.median(r["figure_s"] for r in mine)
        print(f"| {variant} | {train:.1f} | {figure:.1f} |")


if __name__ == "__main__":
    main()
