"""timm -> lambdanet: converted models give timm's logits, layer by layer and end to end.

Random timm models in eval mode, with random BatchNorm statistics and affine parameters (so that
the zero-initialised last γ of every block and the statistics matter) and random relative
embeddings, against our converted models (float32, max |difference| / max |timm logit| <= 1e-4).
Needs torch and timm (test-only requirements); skipped without them.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a test-only requirement (timm comparison)")
timm = pytest.importorskip("timm", reason="timm is a test-only requirement (timm comparison)")
from timm.layers.lambda_layer import LambdaLayer as TimmLambdaLayer  # noqa: E402

from lambdanet import checkpoint, convert_timm  # noqa: E402
from lambdanet.layers import LambdaLayer  # noqa: E402

RTOL = 1e-4
# (model, input side, batch). resnet26t at 80: odd feature maps (5x5 -> 3x3, ceil-mode average
# pool in the shortcut); lambda_resnet26t at 128: the c4 lambda layer sees 8x8 > its 9x9 scope's
# reach (offsets up to +-7 vs +-4); lambda_resnet26rpt_256 only takes 256 (fixed relative tables).
CASES = [
    ("resnet50", 64, 2),
    ("resnet26t", 80, 2),
    ("lambda_resnet26t", 128, 1),
    ("lambda_resnet50ts", 64, 2),
    ("lambda_resnet26rpt_256", 256, 1),
]


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine parameters, std-0.5 relative tables; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            if isinstance(m, TimmLambdaLayer) and m.pos_emb is not None:
                m.pos_emb.normal_(0.0, 0.5, generator=gen)
    return module.eval()


def _relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def _inputs(batch: int, spatial: tuple[int, int], channels: int) -> np.ndarray:
    """[b, C, H, W] float32 (timm layout)."""
    return np.random.default_rng(1).standard_normal((batch, channels, *spatial), np.float32)


def _run_timm(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def timm_models():
    cache = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = _randomize(timm.create_model(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name, side, batch", CASES)
def test_converted_model_gives_timm_logits(timm_models, name, side, batch):
    reference = timm_models(name)
    x = _inputs(batch, (side, side), 3)
    model, variables = convert_timm.convert_state_dict(name, reference.state_dict())
    logits = jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))
    assert _relative_error(logits, _run_timm(reference, x)) <= RTOL
    num_params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert num_params == sum(p.numel() for p in reference.parameters())


def _lambda_variables(layer: TimmLambdaLayer) -> dict:
    """Our LambdaLayer variables from timm's, written out independently of the converter."""
    sd = {k: v.numpy() for k, v in layer.state_dict().items()}

    def bn(prefix):
        return (
            {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]},
            {"mean": sd[f"{prefix}.running_mean"], "var": sd[f"{prefix}.running_var"]},
        )

    (q_params, q_stats), (v_params, v_stats) = bn("norm_q"), bn("norm_v")
    params = {"qkv": {"kernel": sd["qkv.weight"][:, :, 0, 0].T}, "norm_q": q_params}
    params["norm_v"] = v_params
    if layer.pos_emb is None:  # conv_lambda [k, 1, r, r, 1]: R[a, b, k, 0] = w[k, 0, a, b, 0]
        w = sd["conv_lambda.weight"]
        params["rel_embeddings"] = np.einsum("kab->abk", w[:, 0, :, :, 0])[..., None]
        params["position_bias"] = sd["conv_lambda.bias"]
    else:  # pos_emb [2H - 1, 2W - 1, k]
        params["rel_embeddings"] = layer.pos_emb.detach().numpy()[..., None]
    return {"params": params, "batch_stats": {"norm_q": q_stats, "norm_v": v_stats}}


@pytest.mark.parametrize("impl", ["einsum", "conv"])
@pytest.mark.parametrize(
    "scope, spatial",
    [(9, (11, 13)), (None, (6, 8))],
    ids=["local_r9_lambda_conv", "relpos_global"],
)
def test_lambda_layer_matches_timm(scope, spatial, impl):
    torch.manual_seed(0)
    kwargs = dict(r=9) if scope else dict(r=None, feat_size=spatial)
    reference = _randomize(TimmLambdaLayer(32, num_heads=4, dim_head=16, **kwargs))
    ours = LambdaLayer(dim_k=16, heads=4, scope_size=scope, position_bias=bool(scope), impl=impl)
    x = _inputs(2, spatial, 32)
    y = jax.jit(ours.apply)(_lambda_variables(reference), x.transpose(0, 2, 3, 1))
    expected = _run_timm(reference, x).transpose(0, 2, 3, 1)
    assert _relative_error(y, expected) <= RTOL


def test_mismatches_are_listed(timm_models):
    state_dict = dict(timm_models("lambda_resnet26t").state_dict())
    with pytest.raises(ValueError, match="missing from the checkpoint") as wrong_arch:
        convert_timm.convert_state_dict("lambda_resnet50ts", state_dict)
    assert "stages.0.2.conv1_1x1.bn.bias (for params/c2_block3/bn1/bias" in str(wrong_arch.value)

    state_dict["stages.2.1.self_attn.qkv.weight"] = torch.zeros(100, 256, 1, 1)
    state_dict["extra.weight"] = torch.zeros(3)
    del state_dict["stages.3.1.post_attn.running_var"]
    with pytest.raises(ValueError) as broken:
        convert_timm.convert_state_dict("lambda_resnet26t", state_dict)
    message = str(broken.value)
    assert "unused checkpoint entries (1):\n    extra.weight" in message
    assert "stages.2.1.self_attn.qkv.weight: checkpoint (100, 256, 1, 1)" in message
    assert "missing from the checkpoint (1):\n    stages.3.1.post_attn.running_var" in message

    resnet50 = timm_models("resnet50").state_dict()
    with pytest.raises(ValueError, match="without a timm name.*\n    params/c2_block1/se/"):
        convert_timm.convert_state_dict("resnet50", resnet50, se_ratio=0.25)
    with pytest.raises(ValueError, match="convertible models"):
        convert_timm.convert_state_dict("resnet18", state_dict)


def test_checkpoint_file_round_trip(timm_models, tmp_path):
    """.pth (wrapped, DataParallel prefixes) and .safetensors read the same; the conversion of a
    file (scripts/convert_timm.py) verifies the logits against timm, writes an orbax checkpoint,
    and it restores unchanged."""
    from safetensors.torch import save_file

    reference = timm_models("resnet26t")
    state_dict = reference.state_dict()
    save_file(state_dict, tmp_path / "model.safetensors")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, tmp_path / "m.pth"
    )
    from_pth = convert_timm.load_state_dict(str(tmp_path / "m.pth"))
    from_safetensors = convert_timm.load_state_dict(str(tmp_path / "model.safetensors"))
    assert from_pth.keys() == from_safetensors.keys() == state_dict.keys()
    for key, value in from_pth.items():
        np.testing.assert_array_equal(value, from_safetensors[key])

    out = tmp_path / "workdir"
    written, difference = convert_timm.convert_checkpoint(
        "resnet26t", str(out), checkpoint_file=str(tmp_path / "model.safetensors"), tolerance=RTOL
    )
    assert difference <= RTOL
    ckpt_dir, step = checkpoint.resolve_checkpoint(str(out))
    assert ckpt_dir == written
    assert step == convert_timm.WEIGHTS_STEP
    model, converted = convert_timm.convert_state_dict("resnet26t", state_dict)
    manager = checkpoint.create_checkpoint_manager(ckpt_dir, read_only=True)
    checkpoint.check_compatible(manager, step, convert_timm.abstract_variables(model, 64))
    manager.close()
    restored, metadata = convert_timm.load_weights(str(out))
    assert metadata["model_name"] == "resnet26t" and metadata["num_classes"] == 1000
    jax.tree.map(np.testing.assert_array_equal, restored, converted)
    with pytest.raises(ValueError, match="choose an empty --out directory"):
        convert_timm.save_weights(str(out), converted, model_name="resnet26t", source="again")
