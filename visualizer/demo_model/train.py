"""Train an embedded model from scratch; resumable.

    python -m visualizer.demo_model.train --data emoji [--work .cache/train-emoji] [--out assets/emoji-model]
    python -m visualizer.demo_model.train --data shapes [--work .cache/train-shapes] [--out assets/demo-model]

Stage 1 trains the VAE (reconstruction weighted toward the non-background pixels), stage 2 precomputes
latents (scaled to the recipe's std) and trains a v-predicting UNet jointly with a small CLIP text encoder
(EMA weights, v-loss capped at SNR 5, caption dropout). Checkpoints land in --work every few hundred
steps; rerunning the command resumes where it stopped. `--stop-after-minutes` ends a sitting cleanly.
The emoji data needs the emoji font: `apt-get install -y fonts-noto-color-emoji`.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from . import architecture, emoji, scenes

PREDICTION_TYPE = "v_prediction"  # what the UNet outputs, as SD 2.x-768's does; see loss_weights


@dataclass(frozen=True)
class Recipe:
    data: str  # "shapes" (procedural scenes) or "emoji"
    image_size: int
    max_length: int  # tokenizer / text encoder context length
    text_hidden: int
    text_layers: int
    vae_channels: tuple[int, ...]  # downsampling factor 2 ** (len - 1)
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_text_embedding: bool  # also add a pooled caption embedding to the time embedding (every ResNet sees it)
    latent_scale: float  # std of the latents the UNet sees; see encode_latents
    vae_steps: int
    unet_steps: int
    seed: int = 0  # everything (data, init, batches, noise) derives from it
    dataset_size: int = 0  # shapes only: procedural scenes rendered once and cached
    vae_batch: int = 16
    vae_lr: float = 1e-3
    foreground_weight: float = 20.0  # reconstruction loss weight on pixels that differ from the background
    unet_batch: int = 64
    unet_lr: float = 5e-4
    text_lr: float = 1e-3
    caption_dropout: float = 0.1  # share of empty captions, so classifier-free guidance works
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    eval_every: int = 500


RECIPES = {
    "shapes": Recipe(data="shapes", image_size=scenes.IMAGE_SIZE, max_length=24, text_hidden=64, text_layers=2,
                     vae_channels=(32, 64, 64), unet_channels=(64, 128, 128), unet_layers=1,
                     unet_text_embedding=False, latent_scale=0.25, vae_steps=3000, unet_steps=3500,
                     dataset_size=20000),
    # 8x8x4 latents (f = 8, 48x fewer values than pixels, as SD's); latent std 0.5: the shapes model's 0.25 at
    # 16x16 moved by the resolution rule (a quarter of the pixels carry a quarter of the evidence: 2x the std)
    "emoji": Recipe(data="emoji", image_size=emoji.IMAGE_SIZE, max_length=24, text_hidden=128, text_layers=2,
                    vae_channels=(16, 32, 64, 128), unet_channels=(64, 128), unet_layers=1,
                    unet_text_embedding=True, latent_scale=0.5, vae_steps=3500, unet_steps=4500,
                    foreground_weight=5.0, unet_lr=1e-3, eval_every=1000),
}


class Data:
    """A recipe's training images (uint8 [N, 3, H, W], cached in `work`) and their captions."""

    def __init__(self, recipe: Recipe, work: Path):
        self.recipe = recipe
        if recipe.data == "emoji":
            self.images = torch.from_numpy(emoji.images(recipe.image_size, cache=work).copy())
            self.vocabulary = emoji.vocabulary()
            self._captions = emoji.captions()
        else:
            rng = random.Random(recipe.seed)
            self.scenes = [scenes.random_scene(rng) for _ in range(recipe.dataset_size)]
            cache = work / "images.npy"
            if not cache.exists():
                rendered = [np.asarray(scenes.render(s)) for s in tqdm(self.scenes, desc="rendering scenes")]
                np.save(cache, np.stack(rendered).transpose(0, 3, 1, 2))
            self.images = torch.from_numpy(np.load(cache))
            self.vocabulary = scenes.vocabulary()

    def caption(self, index: int, rng: random.Random) -> str:
        if self.recipe.data == "emoji":
            return self._captions[index]
        return scenes.caption(self.scenes[index], rng)

    def captions(self) -> list[str]:
        """One caption per image; what the model folder ships as captions.json."""
        rng = random.Random(self.recipe.seed)
        return [self.caption(i, rng) for i in range(len(self.images))]


def build_models(recipe: Recipe, vocabulary: list[str], tokenizer_dir: Path):
    torch.manual_seed(recipe.seed)
    tokenizer = architecture.write_tokenizer(tokenizer_dir, vocabulary, recipe.max_length)
    encoder = architecture.text_encoder(len(tokenizer.get_vocab()), recipe.max_length, hidden=recipe.text_hidden,
                                        layers=recipe.text_layers)
    vae = architecture.vae(recipe.vae_channels, recipe.image_size)
    latent_size = recipe.image_size // 2 ** (len(recipe.vae_channels) - 1)
    unet = architecture.unet(recipe.unet_channels, latent_size, cross_attention_dim=recipe.text_hidden,
                             layers=recipe.unet_layers, text_embedding=recipe.unet_text_embedding)
    return tokenizer, encoder, vae, unet


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]"""
    return images.float() / 127.5 - 1.0


def foreground_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights: `weight` where a pixel differs from the image's corner colour, else 1."""
    corner = x[:, :, :1, :1]
    differs = (x - corner).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + (weight - 1.0) * differs.float()


def save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class Deadline:
    """Ends a sitting after `minutes` (None: never)."""

    def __init__(self, minutes: float | None):
        self.at = None if minutes is None else time.monotonic() + 60 * minutes

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() > self.at


def train_vae(recipe: Recipe, vae, images: torch.Tensor, work: Path, deadline: Deadline) -> bool:
    """Train (or resume) the VAE; True when it has all its steps."""
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["vae"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    vae.train()
    bar = tqdm(range(step, recipe.vae_steps), initial=step, total=recipe.vae_steps, desc="VAE")
    for step in bar:
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        x = to_unit(images[torch.randint(len(images), (recipe.vae_batch,), generator=g)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = ((recon - x).abs() * foreground_weights(x, recipe.foreground_weight)).mean()
        loss = loss + 1e-6 * posterior.kl().mean()
        for group in opt.param_groups:  # linear decay to a tenth: sharper edges at the end
            group["lr"] = recipe.vae_lr * (1.0 - 0.9 * step / recipe.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % recipe.checkpoint_every == 0 or done == recipe.vae_steps or deadline.passed():
            save(ckpt, vae=vae.state_dict(), opt=opt.state_dict(), step=done)
            if deadline.passed() and done < recipe.vae_steps:
                return False
    return True


@torch.no_grad()
def encode_latents(recipe: Recipe, vae, images: torch.Tensor, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (cached), scaled by the VAE's scaling factor, which this sets.

    The scaling factor makes the latents' std `recipe.latent_scale`. Below 1 it shifts the noise schedule
    toward more noise (as resolution-dependent schedule shifts do): with 16x16 latents at std 1, a shape's
    colour and place stay readable in x_t up to t = 999, so the model takes them from the starting noise
    and never learns them from the caption.
    """
    cache = work / "latents.pt"
    if not cache.exists():
        vae.eval()
        means, stds = [], []
        for i in tqdm(range(0, len(images), 256), desc="encoding latents"):
            dist = vae.encode(to_unit(images[i:i + 256])).latent_dist
            means.append(dist.mean), stds.append(dist.std)
        save(cache, mean=torch.cat(means), std=torch.cat(stds))
    state = torch.load(cache)
    scaling_factor = recipe.latent_scale / float(state["mean"].std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return state["mean"] * scaling_factor, state["std"] * scaling_factor


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def encode_text(tokenizer, encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return encoder(ids)[0]


def loss_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weights on the v-prediction loss: 1 up to SNR `gamma`, then gamma / SNR (min-SNR's cap).

    The v-loss equals (1 + SNR) times the x0-loss, so at high noise every x0 error counts in full.
    That is where the caption alone must decide the layout; the epsilon loss (x0-loss times SNR)
    barely sees those errors, and a model trained with it takes colour and place from the noise.
    """
    return torch.clamp(gamma / snr, max=1.0)


def evaluate(recipe: Recipe, pipe, data: Data) -> dict:
    """The progress score logged while training (each recipe's own measure of prompt adherence)."""
    from . import evaluate as scoring

    pipe.set_progress_bar_config(disable=True)
    if recipe.data == "emoji":
        return scoring.emoji_recall(pipe, scoring.sample_captions(48, seed=1), batch=48)
    return scoring.adherence(pipe, seeds=(0,), samplers=("DDIM",), guidances=(None,))


def train_unet(recipe: Recipe, tokenizer, encoder, vae, unet, data: Data, latents, work: Path,
               deadline: Deadline) -> bool:
    """Train (or resume) the UNet and text encoder; True when they have all their steps."""
    mean, std = latents
    ckpt = work / "unet.pt"
    noise_scheduler = DDPMScheduler(**architecture.SD_BETAS, prediction_type=PREDICTION_TYPE)
    alphas = noise_scheduler.alphas_cumprod
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": recipe.unet_lr},
        {"params": encoder.parameters(), "lr": recipe.text_lr},
    ], weight_decay=0.01)
    ema_unet, ema_encoder = copy.deepcopy(unet), copy.deepcopy(encoder)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        for module, key in ((unet, "unet"), (encoder, "encoder"), (ema_unet, "ema_unet"),
                            (ema_encoder, "ema_encoder"), (opt, "opt")):
            module.load_state_dict(state[key])
        step = state["step"]
    unet.train(), encoder.train()
    total = recipe.unet_steps
    bar = tqdm(range(step, total), initial=step, total=total, desc="UNet+text")
    for step in bar:
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + 7_919 + step)
        rng = random.Random(recipe.seed * 1_000_003 + step)
        idx = torch.randint(len(mean), (recipe.unet_batch,), generator=g)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        captions = ["" if rng.random() < recipe.caption_dropout else data.caption(i, rng) for i in idx.tolist()]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (recipe.unet_batch,), generator=g)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, encode_text(tokenizer, encoder, captions)).sample
        target = noise_scheduler.get_velocity(x0, noise, t)
        weight = loss_weights(alphas[t] / (1 - alphas[t]), recipe.min_snr_gamma)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        for group, peak in zip(opt.param_groups, (recipe.unet_lr, recipe.text_lr)):  # warm up, hold, decay last 30%
            group["lr"] = peak * min(1.0, (step + 1) / 200, max(0.1, (total - step) / (0.3 * total)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(encoder.parameters()), 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay), ema_update(ema_encoder, encoder, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        stopping = deadline.passed() and done < total
        if done % recipe.checkpoint_every == 0 or done == total or stopping:
            save(ckpt, unet=unet.state_dict(), encoder=encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                 ema_encoder=ema_encoder.state_dict(), opt=opt.state_dict(), step=done)
        if done % recipe.eval_every == 0 or done == total:
            pipe = assemble(ema_unet, vae, ema_encoder, tokenizer)
            score = evaluate(recipe, pipe, data)
            unet.train(), encoder.train()
            tqdm.write(f"step {done}: {score}")
            with (work / "eval.log").open("a") as log:
                log.write(json.dumps({"step": done, "minutes": round(time.process_time() / 60, 1), **score}) + "\n")
        if stopping:
            return False
    return True


def assemble(unet, vae, encoder, tokenizer):
    return architecture.assemble(unet, vae, encoder, tokenizer, PREDICTION_TYPE)


def export(recipe: Recipe, unet, vae, encoder, tokenizer, data: Data, out: Path) -> None:
    """Save a diffusers Stable Diffusion folder (UNet stored in fp16 to keep assets small) with its captions."""
    assemble(copy.deepcopy(unet).half(), vae, encoder, tokenizer).save_pretrained(out)
    (out / "captions.json").write_text(json.dumps(sorted(set(data.captions())) if recipe.data == "shapes"
                                                  else data.captions(), indent=0))
    (out / "README.md").write_text(
        f"The visualizer's {recipe.data} model: a small latent diffusion model trained from scratch by\n"
        f"`python -m visualizer.demo_model.train --data {recipe.data}`. See docs/embedded-model.md.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(RECIPES), default="emoji")
    parser.add_argument("--work", type=Path, help="checkpoints and caches (default .cache/train-DATA)")
    parser.add_argument("--out", type=Path, help="final model folder (default: the embedded model's folder)")
    parser.add_argument("--vae-steps", type=int, help="override the recipe's VAE steps")
    parser.add_argument("--unet-steps", type=int, help="override the recipe's UNet steps")
    parser.add_argument("--stop-after-minutes", type=float, help="end this sitting after so long (resume later)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from ..engine.models import EMBEDDED_MODELS

    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.data]
    recipe = replace(recipe, vae_steps=args.vae_steps or recipe.vae_steps,
                     unet_steps=args.unet_steps or recipe.unet_steps)
    work = args.work or Path(f".cache/train-{args.data}")
    out = args.out or EMBEDDED_MODELS[args.data]
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    deadline = Deadline(args.stop_after_minutes)
    data = Data(recipe, work)
    tokenizer, encoder, vae, unet = build_models(recipe, data.vocabulary, work / "tokenizer")
    if not train_vae(recipe, vae, data.images, work, deadline):
        print(f"stopped in the VAE stage; run the same command to resume from {work}")
        return
    vae.eval()
    latents = encode_latents(recipe, vae, data.images, work)
    if not train_unet(recipe, tokenizer, encoder, vae, unet, data, latents, work, deadline):
        print(f"stopped in the UNet stage; run the same command to resume from {work}")
        return
    state = torch.load(work / "unet.pt")
    unet.load_state_dict(state["ema_unet"]), encoder.load_state_dict(state["ema_encoder"])
    export(recipe, unet, vae, encoder, tokenizer, data, out)
    print(f"saved the {args.data} model to {out}")


if __name__ == "__main__":
    main()
