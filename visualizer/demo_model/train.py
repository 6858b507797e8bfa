"""Train the embedded model from scratch on procedural shape scenes; resumable.

    python -m visualizer.demo_model.train [--work .cache/demo-train] [--out assets/demo-model]

Stage 1 trains the VAE (reconstruction weighted toward the shapes), stage 2 precomputes latents (scaled
to std 0.25) and trains a v-predicting UNet jointly with a small CLIP text encoder (EMA weights, v-loss
capped at SNR 5, caption dropout).
Checkpoints land in --work every few hundred steps; rerunning the command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from . import architecture
from . import scenes


PREDICTION_TYPE = "v_prediction"  # what the UNet outputs, as SD 2.x-768's does; see loss_weights


@dataclass
class TrainConfig:
    seed: int = 0  # everything (data, init, batches, noise) derives from it
    dataset_size: int = 20000  # procedural scenes rendered once and cached
    max_length: int = 24  # tokenizer / text encoder context length
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    shape_weight: float = 20.0  # reconstruction loss weight on pixels that differ from the background
    latent_scale: float = 0.25  # std of the latents the UNet sees (SD uses 1.0 for 64x64 latents); see encode_latents
    unet_steps: int = 3500
    unet_batch: int = 64
    unet_lr: float = 5e-4
    text_lr: float = 1e-3
    caption_dropout: float = 0.1  # share of empty captions, so classifier-free guidance works
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    eval_every: int = 500


def build_models(cfg: TrainConfig, tokenizer_dir: Path):
    torch.manual_seed(cfg.seed)
    tokenizer = architecture.write_tokenizer(tokenizer_dir, scenes.vocabulary(), cfg.max_length)
    encoder = architecture.text_encoder(len(tokenizer.get_vocab()), cfg.max_length, hidden=64, layers=2)
    vae = architecture.vae((32, 64, 64), scenes.IMAGE_SIZE)
    unet = architecture.unet((64, 128, 128), scenes.IMAGE_SIZE // 4, cross_attention_dim=64)
    return tokenizer, encoder, vae, unet


def dataset(cfg: TrainConfig, work: Path) -> tuple[list[scenes.Scene], torch.Tensor]:
    """The scenes and their images as uint8 [N, 3, H, W], rendered once and cached in `work`."""
    rng = random.Random(cfg.seed)
    items = [scenes.random_scene(rng) for _ in range(cfg.dataset_size)]
    cache = work / "images.npy"
    if not cache.exists():
        images = np.stack([np.asarray(scenes.render(s)) for s in tqdm(items, desc="rendering scenes")])
        np.save(cache, images.transpose(0, 3, 1, 2))
    return items, torch.from_numpy(np.load(cache))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]"""
    return images.float() / 127.5 - 1.0


def shape_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights: `weight` where a pixel differs from the image's corner colour, else 1."""
    corner = x[:, :, :1, :1]
    differs = (x - corner).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + (weight - 1.0) * differs.float()


def save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_vae(cfg: TrainConfig, vae, images: torch.Tensor, work: Path) -> None:
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["vae"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    vae.train()
    bar = tqdm(range(step, cfg.vae_steps), initial=step, total=cfg.vae_steps, desc="VAE")
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x = to_unit(images[torch.randint(len(images), (cfg.vae_batch,), generator=g)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = ((recon - x).abs() * shape_weights(x, cfg.shape_weight)).mean() + 1e-6 * posterior.kl().mean()
        for group in opt.param_groups:  # linear decay to a tenth: sharper edges at the end
            group["lr"] = cfg.vae_lr * (1.0 - 0.9 * step / cfg.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save(ckpt, vae=vae.state_dict(), opt=opt.state_dict(), step=step + 1)


@torch.no_grad()
def encode_latents(cfg: TrainConfig, vae, images: torch.Tensor, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (cached), scaled by the VAE's scaling factor, which this sets.

    The scaling factor makes the latents' std `cfg.latent_scale`. Below 1 it shifts the noise schedule
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
    scaling_factor = cfg.latent_scale / float(state["mean"].std())
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


def train_unet(cfg, tokenizer, encoder, vae, unet, items, latents, work: Path) -> None:
    mean, std = latents
    ckpt = work / "unet.pt"
    noise_scheduler = DDPMScheduler(**architecture.SD_BETAS, prediction_type=PREDICTION_TYPE)
    alphas = noise_scheduler.alphas_cumprod
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": cfg.unet_lr},
        {"params": encoder.parameters(), "lr": cfg.text_lr},
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
    bar = tqdm(range(step, cfg.unet_steps), initial=step, total=cfg.unet_steps, desc="UNet+text")
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7_919 + step)
        rng = random.Random(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(mean), (cfg.unet_batch,), generator=g)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        captions = ["" if rng.random() < cfg.caption_dropout else scenes.caption(items[i], rng) for i in idx.tolist()]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, encode_text(tokenizer, encoder, captions)).sample
        target = noise_scheduler.get_velocity(x0, noise, t)
        weight = loss_weights(alphas[t] / (1 - alphas[t]), cfg.min_snr_gamma)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        for group, peak in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr)):  # warm up, hold, decay the last 30%
            group["lr"] = peak * min(1.0, (step + 1) / 200, max(0.1, (cfg.unet_steps - step) / (0.3 * cfg.unet_steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(encoder.parameters()), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay), ema_update(ema_encoder, encoder, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            save(ckpt, unet=unet.state_dict(), encoder=encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                 ema_encoder=ema_encoder.state_dict(), opt=opt.state_dict(), step=done)
        if done % cfg.eval_every == 0 or done == cfg.unet_steps:
            pipe = export(ema_unet, vae, ema_encoder, tokenizer, work / "export")
            from .evaluate import adherence
            score = adherence(pipe, seeds=(0,), samplers=("DDIM",), guidances=(None,))
            tqdm.write(f"step {done}: {score}")
            with (work / "eval.log").open("a") as log:
                log.write(f"step {done}: {score}\n")


def export(unet, vae, encoder, tokenizer, out: Path):
    """Save a diffusers Stable Diffusion folder (UNet stored in fp16 to keep assets small)."""
    pipe = architecture.assemble(copy.deepcopy(unet).half(), vae, encoder, tokenizer, PREDICTION_TYPE)
    pipe.save_pretrained(out)
    (out / "README.md").write_text(
        "The visualizer's embedded model: a tiny latent diffusion model trained from scratch on procedural\n"
        "shape scenes by `python -m visualizer.demo_model.train`. See the project README.\n")
    return architecture.assemble(unet, vae, encoder, tokenizer, PREDICTION_TYPE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".cache/demo-train"), help="checkpoints and caches")
    parser.add_argument("--out", type=Path, default=Path("assets/demo-model"), help="final model folder")
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "config.txt").write_text(repr(asdict(cfg)))
    tokenizer, encoder, vae, unet = build_models(cfg, args.work / "tokenizer")
    items, images = dataset(cfg, args.work)
    train_vae(cfg, vae, images, args.work)
    vae.eval()
    latents = encode_latents(cfg, vae, images, args.work)
    train_unet(cfg, tokenizer, encoder, vae, unet, items, latents, args.work)
    ema = torch.load(args.work / "unet.pt")
    unet.load_state_dict(ema["ema_unet"]), encoder.load_state_dict(ema["ema_encoder"])
    export(unet, vae, encoder, tokenizer, args.out)
    print(f"saved the embedded model to {args.out}")


if __name__ == "__main__":
    main()
