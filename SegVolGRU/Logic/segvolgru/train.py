"""``segvolgru train``: a reduced SegVol (no text tower) and its GRU click correction, trained together.

One training step takes one generated phantom (or one image/label case of ``--data``, see
:mod:`segvolgru.train_data`) at the model's input size, runs the official preprocessing, encodes it once, and for
up to ``structures_per_step`` of its labels plays an interactive session as
:class:`~segvolgru.session.InteractiveSession` does: a box prompt (the challenge's box rule), then rounds of the
challenge's simulated corrective clicks on the current prediction (p > 0.5). Every click round re-decodes SegVol with
the box and all clicks so far, builds the correction rows from the detached probabilities, runs the GRU cell with
the hidden state carried from the previous round (gradients flow through it), writes the deltas back and fuses with
the previous round's logits. The loss is Dice + BCE on the box step's logits and on every round's corrected logits.

``--init`` starts from a model file instead of random weights, and ``--train correction|decoder`` freezes the rest
(:func:`trainable_parameters`) for a fine-tune. Every random draw of a step comes from generators seeded by
(seed, step), so a resumed run repeats an uninterrupted one exactly. Volumes are (K, J, I) = (D, H, W) numpy
arrays; prompts are voxel indices of the model input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .checkpoint import Checkpoint, apply_state, read_checkpoint, save_checkpoint
from .click_step import refine_step
from .clicks import box_dict_to_kji, challenge_box, simulate_click
from .config import SegVolConfig
from .correction import CorrectionConfig
from .errors import InputError
from .files import check_output_folder, write_atomic, write_text_atomic
from .network import SegVol, build_model
from .phantoms import make_phantom
from .preprocessing import nearest_exact_indices, preprocess
from .train_data import FolderSource
from .validation import positive_float, positive_int

# Click rounds per structure: mostly 2-3, rarely 0 or 5 (the schedule).
CLICK_ROUNDS = (0, 1, 2, 3, 4, 5)
CLICK_ROUND_WEIGHTS = (0.05, 0.1, 0.35, 0.35, 0.1, 0.05)
SEGVOL_CLICK_LOSS_WEIGHT = 0.5
# Training phantoms use seeds seed * PHANTOM_SEED_STRIDE + step; held-out sets use seeds from HELD_OUT_SEED_BASE.
PHANTOM_SEED_STRIDE = 1_000_000
HELD_OUT_SEED_BASE = 900_000_000
# Parameter-name prefixes each ``--train`` part optimises; every other parameter is frozen.
TRAINED_PREFIXES = {"all": ("",), "correction": ("correction.",),
                    "decoder": ("mask_decoder.", "prompt_encoder.", "correction.")}

DEMO_CONFIG = SegVolConfig(
    spatial_size=(32, 96, 96), patch_size=(4, 16, 16), hidden_size=192, mlp_dim=768, num_layers=4, num_heads=6,
    decoder_depth=2, decoder_heads=8, decoder_mlp_dim=768, iou_head_hidden_dim=64, text_tower=False,
    # the shipped demo model trained without a positive reach; its file gets one at export (below)
    correction=CorrectionConfig(hidden_size=192, row_dim=64, positive_reach=None).to_dict())
# Correction settings that act only at inference, written into the exported file of a demo-configuration run and
# named in its recipe: chosen on validation phantoms (seeds 500000+) after the shipped model was trained.
DEMO_INFERENCE_SETTINGS = {
    "correction": {"positive_reach": 2.0},
    "why": "chosen after training on validation phantoms (seeds 500000+), never on the held-out sets; it trained "
           "with positive_reach None; inference settings, not weights"}


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (learning rate per step, seconds for the time limits)."""

    steps: int = 1500
    seed: int = 0
    lr: float = 4e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    structures_per_step: int = 2
    checkpoint_every_s: float = 180.0
    max_minutes: float | None = None
    part: str = "all"


@dataclass
class Sample:
    """A model-input-sized training example: normalised image (K, J, I) float32 in [0, 1], labels (K, J, I)."""

    image: np.ndarray
    labels: np.ndarray


def prepare_sample(volume: np.ndarray, labels: np.ndarray, spatial_size: Sequence[int]) -> Sample:
    """Official preprocessing of ``volume``; ``labels`` are cropped and resampled with the same nearest rule, so
    that the pair is what the engine's zoom-out view sees."""
    if volume.shape != labels.shape:
        raise InputError(f"image {volume.shape} and labels {labels.shape} differ in shape: pass a matching pair")
    pre = preprocess(volume, spatial_size)
    crop = labels[tuple(slice(a, b) for a, b in zip(pre.crop_start, pre.crop_stop))]
    index = [nearest_exact_indices(n, m) for n, m in zip(crop.shape, spatial_size)]
    return Sample(pre.zoom_out, np.ascontiguousarray(crop[np.ix_(*index)]).astype(np.int16))


def phantom_source(seed: int, spatial_size: Sequence[int]) -> Callable[[int], Sample]:
    """The step -> sample function of the phantom recipe (phantom seed = seed * PHANTOM_SEED_STRIDE + step)."""
    def sample(step: int) -> Sample:
        volume, labels, _ = make_phantom(seed * PHANTOM_SEED_STRIDE + step, shape=tuple(spatial_size))
        return prepare_sample(volume, labels, spatial_size)

    return sample


def trainable_parameters(model: SegVol, part: str) -> list[torch.nn.Parameter]:
    """The parameters ``part`` trains (see TRAINED_PREFIXES); the others get ``requires_grad=False``, so that
    no gradient is computed for them, and are left out of the optimiser, so that weight decay does not move them."""
    if part not in TRAINED_PREFIXES:
        raise InputError(f"unknown training part {part!r}: choose one of {', '.join(TRAINED_PREFIXES)}")
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINED_PREFIXES[part]))
        if parameter.requires_grad:
            trained.append(parameter)
    return trained


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss + mean BCE of (K, J, I) logits against a {0, 1} float target."""
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return (1 - dice) + F.binary_cross_entropy_with_logits(logits, target)


def hard_dice(logits: torch.Tensor, target: np.ndarray) -> float:
    pred = (logits > 0).cpu().numpy()
    total = pred.sum() + target.sum()
    return float(2 * np.logical_and(pred, target).sum() / total) if total else 1.0


def _decode(model: SegVol, embedding: torch.Tensor, box: tuple, clicks: list) -> torch.Tensor:
    device = embedding.device
    boxes = torch.tensor([box], dtype=torch.float32, device=device)
    points = None
    if clicks:
        coords = torch.tensor([[c.k, c.j, c.i] for c in clicks], dtype=torch.float32, device=device)[None]
        labels = torch.tensor([[float(c.positive) for c in clicks]], device=device)
        points = (coords, labels)
    return model.upsample(model.decode(embedding, boxes, points))[0, 0]


def structure_session(model: SegVol, embedding: torch.Tensor, gt: np.ndarray, rounds: int,
                      rng: np.random.Generator, image: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Loss (summed over the box step and every click round) and the hard Dice after each step, for one
    structure's binary mask ``gt`` (K, J, I) of the normalised ``image``; clicks stop early when the prediction
    equals ``gt``."""
    config = model.correction.config
    target = torch.from_numpy(gt.astype(np.float32)).to(embedding.device)
    box = box_dict_to_kji(challenge_box(gt, rng))
    logits = _decode(model, embedding, box, [])
    loss = dice_bce_loss(logits, target)
    dices = [hard_dice(logits.detach(), gt)]
    hidden = model.correction.initial_state(embedding.device)
    previous = logits.detach()
    clicks = []
    for _ in range(rounds):
        click = simulate_click(previous.cpu().numpy() > 0, gt, seed=int(rng.integers(2 ** 31)))
        if click is None:
            break
        clicks.append(click)
        new = _decode(model, embedding, box, clicks)
        points = np.array([[c.k, c.j, c.i] for c in clicks], np.int64)
        polarity = np.array([int(c.positive) for c in clicks], np.int64)
        # the click step sessions run, with gradients into SegVol's click decoding and the corrector
        step = refine_step(previous, new, points, polarity, config, corrector=model.correction, hidden=hidden,
                           image=image)
        corrected, hidden = step.logits, step.hidden
        # SegVol's own click decoding is supervised too, so it does not learn to lean on the correction (with only
        # the corrected logits supervised, "GRU off" got worse with every click).
        loss = loss + dice_bce_loss(corrected, target) + SEGVOL_CLICK_LOSS_WEIGHT * dice_bce_loss(new, target)
        dices.append(hard_dice(corrected.detach(), gt))
        previous = corrected.detach()
    return loss / len(dices), dices


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, 7])


def train_step(model: SegVol, optimizer: torch.optim.Optimizer, sample: Sample, settings: TrainSettings,
               step: int, device: torch.device) -> dict:
    """One optimisation step on one sample; returns the step's log record."""
    rng = _step_rng(settings.seed, step)
    present = [int(v) for v in np.unique(sample.labels) if v > 0]
    chosen = rng.permutation(present)[:settings.structures_per_step] if present else []
    image = torch.from_numpy(sample.image)[None, None].to(device)
    embedding = model.encode(image)  # a frozen encoder on an input without grad records no graph anyway
    total = torch.zeros((), device=device)
    box_dice, last_dice, clicks = [], [], 0
    for value in chosen:
        rounds = int(rng.choice(CLICK_ROUNDS, p=CLICK_ROUND_WEIGHTS))
        loss, dices = structure_session(model, embedding, sample.labels == value, rounds, rng, image[0, 0])
        total = total + loss / len(chosen)
        box_dice.append(dices[0])
        last_dice.append(dices[-1])
        clicks += len(dices) - 1
    optimizer.zero_grad(set_to_none=True)
    # With a frozen SegVol a step whose sessions had no click round leaves nothing trainable in the loss.
    if len(chosen) and total.requires_grad:
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
    return {"step": step, "loss": float(total.detach()), "box_dice": float(np.mean(box_dice)) if box_dice else None,
            "final_dice": float(np.mean(last_dice)) if last_dice else None, "clicks": clicks}


def _learning_rate(settings: TrainSettings, step: int) -> float:
    warm = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    progress = min(step / max(settings.steps, 1), 1.0)
    return float(settings.lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))))  # plain: see _save_state


def _save_state(path: Path, model: SegVol, optimizer: torch.optim.Optimizer, step: int, log: list[dict],
                recipe: dict) -> None:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    # plain data and tensors only, so that the file loads with weights_only=True (nothing is unpickled)
    numpy_rng = (str(name), torch.from_numpy(np.asarray(keys, np.int64)), int(position), int(has_gauss), float(gauss))
    state = {"config": model.config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "log": log, "recipe": recipe, "torch_rng": torch.get_rng_state(), "numpy_rng": numpy_rng,
             "python_rng": random.getstate()}
    write_atomic(path, lambda temporary: torch.save(state, temporary))  # a crash never leaves a truncated file


def _read_state(path: Path, keys: tuple[str, ...] = ("config", "model", "optimizer", "step", "log", "recipe")
                ) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read the resume file {path} ({reason}): it is damaged, or was written by an "
                         "older version whose files need unpickling; start over with --no-resume or in another "
                         "folder") from None
    missing = sorted(set(keys) - set(state)) if isinstance(state, dict) else list(keys)
    if missing:
        raise InputError(f"{path} is not a resume file of this command (it lacks {missing}): start over with "
                         "--no-resume or in another folder")
    return state


def _load_state(path: Path, model: SegVol, optimizer: torch.optim.Optimizer, part: str) -> tuple[int, list[dict]]:
    state = _read_state(path)
    if state["config"] != model.config.to_dict():
        raise InputError(f"{path} was written for another model configuration: resume with the configuration it "
                         "was trained with, or start a new run in another folder")
    # the part is in the recipe's settings; resume files from before --train trained everything
    saved = state["recipe"].get("settings", {}).get("part", "all")
    if saved != part:
        raise InputError(f"{path} was written by a '--train {saved}' run, this one is '--train {part}': resume "
                         f"with --train {saved}, or start the new run in another folder (or with --no-resume)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    name, keys, position, has_gauss, gauss = state["numpy_rng"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python_rng"])
    return int(state["step"]), list(state["log"])


def _init_checkpoint(init: str | Path, config: SegVolConfig | None) -> Checkpoint:
    ckpt = read_checkpoint(init)
    if ckpt.config is None or not ckpt.config.correction:
        raise InputError(f"{init} has no correction entry in its configuration: --init needs a segvolgru model file "
                         "with the GRU correction (e.g. segvolgru/models/demo.pt or a model.pt of 'segvolgru train')")
    if config is not None and config != ckpt.config:
        raise InputError(f"{init} holds another model configuration than the one given: pass config=None to "
                         "train the checkpoint's own configuration")
    return ckpt


def train(config: SegVolConfig | None, out_dir: str | Path, settings: TrainSettings = TrainSettings(),
          source: Callable[[int], Sample] | None = None, resume: bool = True, device: str = "auto",
          recipe: dict | None = None, progress: bool = True, until: int | None = None,
          data: str | Path | None = None, init: str | Path | None = None) -> SegVol:
    """Train ``config`` (which needs a ``correction`` entry) for ``settings.steps`` steps, or stop at step
    ``until`` (the learning-rate schedule still spans ``settings.steps``, so a run split with ``until`` and resumed
    equals an uninterrupted one).

    ``out_dir`` receives ``train_state.pt`` (model, optimiser, step, RNG states, log; rewritten every
    ``checkpoint_every_s`` seconds and at the end), ``loss_log.jsonl`` (one record per step) and ``model.pt``
    (the project's checkpoint format, fp16, with the recipe). With ``resume`` an existing ``train_state.pt`` is
    continued and the loss log is rewritten from it (records after its last save are dropped, then redone).
    ``source(step)`` gives each step's sample (default: phantoms of the seed); ``data`` instead draws the cases of
    a folder (:class:`~segvolgru.train_data.FolderSource`, named in the recipe). ``init`` starts from a model
    file, whose configuration is trained (``config`` may then be None); ``settings.part`` selects what is trained
    (:func:`trainable_parameters`). ``device`` "auto" takes a GPU when one is present. Returns the trained model in
    eval mode on the CPU.
    """
    check_output_folder(out_dir)
    ckpt = _init_checkpoint(init, config) if init is not None else None
    config = ckpt.config if ckpt is not None else config
    if config is None:
        raise InputError("train() needs a configuration or an init checkpoint to take it from")
    if not config.correction:
        raise InputError("the configuration has no correction module: set config.correction (e.g. "
                         "CorrectionConfig().to_dict()) so that the GRU is trained with SegVol")
    if config.text_tower:
        raise InputError("training starts from scratch without a text tower: use text_tower=False")
    if source is not None and data is not None:
        raise InputError("give either a sample source or a data folder, not both")
    recipe = dict(recipe or {}, settings=dataclasses.asdict(settings))
    if data is not None:
        # Built before anything is written, so that a folder without cases leaves no output folder behind.
        source = FolderSource(data, config.spatial_size, settings.seed)
        recipe["data"] = source.recipe()
    if source is None:
        if (settings.seed + 1) * PHANTOM_SEED_STRIDE + settings.steps > HELD_OUT_SEED_BASE:
            raise InputError(f"seed {settings.seed} with {settings.steps} steps would train on held-out phantoms "
                             f"(seeds from {HELD_OUT_SEED_BASE}): use a seed below "
                             f"{HELD_OUT_SEED_BASE // PHANTOM_SEED_STRIDE - 1}")
        recipe.setdefault("data", f"segvolgru.phantoms.make_phantom(seed * {PHANTOM_SEED_STRIDE} + step, shape="
                                  f"{list(config.spatial_size)}), preprocessed with segvolgru.preprocess")
    if init is not None:
        recipe["init"] = str(Path(init).resolve())
    elif config == DEMO_CONFIG:
        recipe.setdefault("inference_settings", DEMO_INFERENCE_SETTINGS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    torch.manual_seed(settings.seed)
    model = build_model(config)
    if ckpt is not None:
        apply_state(model, ckpt, source=str(init))
    model = model.to(target).train()
    optimizer = torch.optim.AdamW(trainable_parameters(model, settings.part), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    source = source or phantom_source(settings.seed, config.spatial_size)
    state_path, log_path = out / "train_state.pt", out / "loss_log.jsonl"
    step, log = (_load_state(state_path, model, optimizer, settings.part) if resume and state_path.exists()
                 else (0, []))
    started = time.perf_counter()
    last_save = started
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, initial=step, file=sys.stderr, desc="train", dynamic_ncols=True)
    stop = settings.steps if until is None else min(until, settings.steps)
    write_text_atomic(log_path, "".join(json.dumps(record) + "\n" for record in log))
    with log_path.open("a") as log_file:
        while step < stop:
            if settings.max_minutes is not None and time.perf_counter() - started > 60 * settings.max_minutes:
                break
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(settings, step)
            t0 = time.perf_counter()
            record = train_step(model, optimizer, source(step), settings, step, target)
            record["seconds"] = time.perf_counter() - t0
            log.append(record)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", box=record["box_dice"], final=record["final_dice"])
            if time.perf_counter() - last_save > settings.checkpoint_every_s:
                _save_state(state_path, model, optimizer, step, log, recipe)
                last_save = time.perf_counter()
    if bar is not None:
        bar.close()
    _save_state(state_path, model, optimizer, step, log, dict(recipe, device=str(target)))
    export_model(state_path, out / "model.pt")
    return model.eval().cpu()


def export_model(state_path: str | Path, model_path: str | Path) -> dict:
    """Write the shippable fp16 checkpoint ``{'config', 'model', 'recipe'}`` of a resume file (also of an
    intermediate one); the recipe gains ``steps_done`` and ``wall_time_s`` (the summed step times), and the
    correction settings of ``recipe["inference_settings"]`` replace the trained ones in the file. Returns it."""
    state = _read_state(Path(state_path))
    config = dict(state["config"])
    overrides = state["recipe"].get("inference_settings", {}).get("correction", {})
    if overrides:
        config["correction"] = dict(config["correction"], **overrides)
    model = build_model(SegVolConfig.from_dict(config))
    model.load_state_dict(state["model"])
    recipe = dict(state["recipe"], steps_done=int(state["step"]),
                  wall_time_s=round(sum(r["seconds"] for r in state["log"]), 1), torch=str(torch.__version__))
    save_checkpoint(model, model_path, recipe=recipe, half=True)
    return recipe


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="segvolgru train",
        description="Train a reduced SegVol (no text tower) and its GRU click correction on generated phantoms "
                    "or on the image/label cases of a folder, from scratch or from a model file. Writes "
                    "train_state.pt (resumable), loss_log.jsonl and model.pt (a DEMO model, not for clinical use) "
                    "into OUT.")
    parser.add_argument("out", help="output folder (resumes from OUT/train_state.pt when present)")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="optimisation steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the phantoms (or of the case draw) and of every draw (default 0)")
    parser.add_argument("--data", metavar="FOLDER", default=None,
                        help="train on the cases of FOLDER instead of phantoms: challenge .npz files (imgs, gts, "
                             "spacing) or <case>.nii.gz + <case>_label.nii.gz pairs, as 'segvolgru evaluate' reads")
    parser.add_argument("--init", metavar="CHECKPOINT", default=None,
                        help="start from this segvolgru model file (e.g. models/demo.pt) with its configuration, "
                             "instead of random weights and the demo configuration")
    parser.add_argument("--train", dest="part", choices=tuple(TRAINED_PREFIXES), default="all",
                        help="what is trained: all (default), correction (the GRU correction only) or decoder "
                             "(mask decoder, prompt encoder and correction; the image encoder stays frozen)")
    parser.add_argument("--lr", type=positive_float, default=TrainSettings.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--structures-per-step", type=int, default=TrainSettings.structures_per_step)
    parser.add_argument("--max-minutes", type=positive_float, default=None, help="stop (and save) after this wall time")
    parser.add_argument("--checkpoint-every", type=float, default=180.0, help="seconds between resume files")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    parser.add_argument("--no-resume", action="store_true", help="start over even if OUT/train_state.pt exists")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.steps, seed=args.seed, lr=args.lr,
                             structures_per_step=args.structures_per_step, checkpoint_every_s=args.checkpoint_every,
                             max_minutes=args.max_minutes, part=args.part)
    trained_on = f"the cases of {args.data}" if args.data else "generated phantoms"
    recipe = {"command": "segvolgru train " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:])),
              "seed": args.seed, "note": f"demo model trained on {trained_on}; not for clinical use"}
    train(None if args.init else DEMO_CONFIG, args.out, settings, resume=not args.no_resume, device=args.device,
          recipe=recipe, data=args.data, init=args.init)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
