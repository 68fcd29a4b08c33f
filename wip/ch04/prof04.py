# time one training step of chapter 4's three models (cpu preset), unfused and fused attention, and chapter 3's U-Net
import time, torch, sys
sys.path.insert(0, "notebooks")
from minisd.unet import UNet, UNetConfig
from minisd.attention import set_attention_options
from minisd.diffusion import NoiseSchedule, diffusion_loss
torch.manual_seed(0)
UNET = dict(base_channels=32, channel_mults=(1, 2, 2), blocks_per_level=1, heads=4, attention_levels=(1, 2))
sched = NoiseSchedule(1000, "cosine")
x = torch.randn(32, 3, 32, 32); t = torch.randint(0, 1000, (32,)); ctx = torch.randn(32, 16, 32); mask = torch.ones(32, 16, dtype=torch.bool)
def step(m, **kw):
    opt = torch.optim.AdamW(m.parameters(), 2e-3)
    for i in range(6):
        if i == 2: t0 = time.perf_counter()
        out = m(x, t, **kw); loss = (out - x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
    return (time.perf_counter() - t0) / 4
for name, cfg, kw in (("no text (like concat)", UNetConfig(**UNET, extra_in_channels=8), dict(extra=torch.randn(32, 8, 32, 32))),
                      ("cross attention", UNetConfig(**UNET, context_dim=32), dict(context=ctx, context_mask=mask)),
                      ("no attention at all", UNetConfig(**{**UNET, "attention_levels": ()}), {}),
                      ("attention only at 8×8", UNetConfig(**{**UNET, "attention_levels": (2,)}, context_dim=32), dict(context=ctx, context_mask=mask))):
    m = UNet(cfg)
    for fused in (False, True):
        set_attention_options(m, fused=fused)
        print(f"{name:<24} fused={fused!s:<5} {step(m, **kw):.3f} s/step", flush=True)
