"""Train the MobileNet v1 benchmark base on the full CIFAR-10 JPEG copy (32x32 inputs).

What ResNet-8's run taught (train_resnet8.py, its log): SGD with Nesterov momentum on a
cosine, pad-and-crop + flip augmentation and batch 128 generalise better than Adam on the
MLPerf recipe. Width ``--alpha`` (default 0.5) trades accuracy for time on 2 cores.
Resumable: every epoch writes ``mobilenet_v1_cifar10.ckpt.keras`` (weights and optimizer
state) and appends one line to ``mobilenet_v1_cifar10.log``; run the same command again to
continue. The best test accuracy's weights are ``mobilenet_v1_cifar10.keras``.

    python benchmarks/bases/train_mobilenet.py --epochs 60           # resume or start
    python benchmarks/bases/train_mobilenet.py --epochs 2 --limit 2000 --out /tmp/mn  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from train_resnet8 import batches, sgd_rate

HERE = Path(__file__).resolve().parent
NAME = "mobilenet_v1_cifar10"


def build(alpha: float):
    import collabopt as co

    return co.models.mobilenet_v1(alpha, (32, 32, 3), classes=10)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60, help="total epochs (resumes)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.05, help="peak SGD rate")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--limit", type=int,
                    help="train on N images spread through the set (smoke runs)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder of the files")
    args = ap.parse_args(argv)

    import keras

    import collabopt as co

    ckpt, best, log, state_file = (args.out / f"{NAME}{s}" for s in
                                   (".ckpt.keras", ".keras", ".log", ".json"))
    args.out.mkdir(parents=True, exist_ok=True)
    (x, y), (xt, yt) = co.datasets.cifar10()
    if args.limit:  # spread through the set: it is sorted by class
        x, y = x[::len(x) // args.limit][:args.limit], y[::len(y) // args.limit][:args.limit]
    state = json.loads(state_file.read_text()) if state_file.exists() and ckpt.exists() \
        else {"epoch": 0, "best": 0.0, "seconds": 0.0, "alpha": args.alpha}
    if state_file.exists() and not ckpt.exists():  # never overwrite a stored base
        done = json.loads(state_file.read_text())
        if done["epoch"] >= args.epochs:
            print(f"{best.name} is trained ({done['epoch']} epochs, {done['best']:.2%}): "
                  "nothing to do")
            return
        raise SystemExit(f"{ckpt.name} is missing, so epoch {done['epoch']} cannot resume: "
                         f"move {best.name} and {state_file.name} away to start over")
    if state["alpha"] != args.alpha:
        raise SystemExit(f"{ckpt} was trained with --alpha {state['alpha']}: pass it, or "
                         "move the files away to start another width")
    if ckpt.exists():
        model = keras.models.load_model(ckpt)
    else:
        keras.utils.set_random_seed(0)
        model = build(args.alpha)
        model.compile(keras.optimizers.SGD(args.lr, momentum=0.9, nesterov=True),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        lr = sgd_rate(epoch, args.epochs, args.lr)
        model.optimizer.learning_rate.assign(lr)
        t = time.perf_counter()
        it, steps = batches(x, y, args.batch, epoch, crop=True)
        model.fit(it, steps_per_epoch=steps, epochs=1, verbose=2)
        loss, acc = model.evaluate(xt, yt, batch_size=500, verbose=0)
        state["seconds"] += time.perf_counter() - t
        state["epoch"] = epoch + 1
        if acc > state["best"]:  # the base itself: weights only, no optimizer
            state["best"] = float(acc)
            base = build(args.alpha)
            base.set_weights(model.get_weights())
            base.save(str(best) + ".tmp.keras")
            os.replace(str(best) + ".tmp.keras", best)
        model.save(str(ckpt) + ".tmp.keras")
        os.replace(str(ckpt) + ".tmp.keras", ckpt)
        state_file.write_text(json.dumps(state, indent=1))
        with log.open("a") as f:
            f.write(f"epoch {epoch + 1} test_acc {acc:.4f} test_loss {loss:.4f} "
                    f"best {state['best']:.4f} lr {lr:.2e} alpha {args.alpha} "
                    f"batch {args.batch} hours {state['seconds'] / 3600:.2f} "
                    f"backend {keras.backend.backend()} host {platform.node()} "
                    f"cpus {os.cpu_count()}\n")


if __name__ == "__main__":
    main()
