"""Train the DS-CNN-L keyword-spotting base on the spoken digits (49x10 MFCC, standardized),
on either split the loader has.

    python benchmarks/bases/train_ds_cnn.py --split holdout    # speaker 'theo' is the test set
    python benchmarks/bases/train_ds_cnn.py --split official   # recordings 0-4 of everyone

The recipe of the side-by-side tables (``bench_vs_tfmot.py kws``): Adam 1e-3, batch 64, here
on a cosine to zero over ``--epochs`` so the base ends converged rather than wherever a
constant rate left it. The base is the last epoch's weights — no epoch is picked by its test
accuracy, so the test set stays unseen. Resumable: every epoch writes
``ds_cnn_l_<split>.ckpt.keras`` (weights and optimizer state), appends one line to
``ds_cnn_l_<split>.log`` and updates ``ds_cnn_l_<split>.json``; run the same command again to
continue. The finished base is ``ds_cnn_l_<split>.keras``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["holdout", "official"], default="holdout")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    import keras

    import collabopt as co

    stem = HERE / f"ds_cnn_l_{args.split}"
    ckpt, base_file = Path(f"{stem}.ckpt.keras"), Path(f"{stem}.keras")
    log_file, state_file = Path(f"{stem}.log"), Path(f"{stem}.json")
    (x, y), (xt, yt) = co.datasets.speech_digits(
        holdout_speaker="theo" if args.split == "holdout" else None)
    state = json.loads(state_file.read_text()) if state_file.exists() and ckpt.exists() else \
        {"epoch": 0, "seconds": 0.0, "test_accuracy": None}
    if ckpt.exists():
        model = keras.models.load_model(ckpt)
    else:
        keras.utils.set_random_seed(0)
        model = co.models.ds_cnn("L", classes=10)
        model.compile(keras.optimizers.Adam(args.lr),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))
        model.optimizer.learning_rate.assign(lr)
        keras.utils.set_random_seed(epoch)  # a resumed epoch shuffles as the original would
        t = time.perf_counter()
        model.fit(x, y, epochs=1, batch_size=64, verbose=2)
        loss, acc = model.evaluate(xt, yt, batch_size=500, verbose=0)
        state["seconds"] += time.perf_counter() - t
        state["epoch"], state["test_accuracy"] = epoch + 1, float(acc)
        model.save(f"{ckpt}.tmp.keras")
        os.replace(f"{ckpt}.tmp.keras", ckpt)
        state_file.write_text(json.dumps(state, indent=1))
        with log_file.open("a") as f:
            f.write(f"epoch {epoch + 1} test_acc {acc:.4f} test_loss {loss:.4f} lr {lr:.2e} "
                    f"hours {state['seconds'] / 3600:.2f} backend {keras.backend.backend()} "
                    f"host {platform.node()} cpus {os.cpu_count()}\n")
    base = co.models.ds_cnn("L", classes=10)  # weights only, no optimizer state
    base.set_weights(model.get_weights())
    base.save(f"{base_file}.tmp.keras")
    os.replace(f"{base_file}.tmp.keras", base_file)
    print(f"{base_file.name}: test top-1 {state['test_accuracy']:.2%} after "
          f"{state['epoch']} epochs ({state['seconds'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
