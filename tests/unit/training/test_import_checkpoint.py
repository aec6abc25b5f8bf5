"""Importing the reference code's checkpoint (pmmrec import-checkpoint).

The test writes a checkpoint with the reference's key names and tiny shapes, imports it, and checks the imported
model against an independent re-implementation of the reference's forward pass (written here from the reference
architecture: post-LN SASRec with an additive -1e9 mask and positions counted from the left; a BERT layer over
the concatenated *raw* text and image tokens, additive -10000 mask, masked mean).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pmmrec.cli import main
from pmmrec.config import load_config
from pmmrec.data.batch import ItemInputs
from pmmrec.data.images import CLIP_MEAN, CLIP_STD
from pmmrec.errors import PmmrecError
from pmmrec.models.pmmrec import PMMRec
from pmmrec.pretrained import minilm_path
from pmmrec.runtime.checkpoint import load_checkpoint
from pmmrec.training.import_checkpoint import PAPER, import_checkpoint, map_name
from pmmrec.training.transfer import init_from, transfer_config

D, L, BLOCKS, SASREC_HEADS, FUSION_HEADS = 128, 5, 2, 2, 2  # fusion heads: BERT's 64-wide heads, 128 / 64
TEXT_H, VISION_H, IMAGE = 32, 32, 32


def _text_model(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=TEXT_H, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def _vision_model(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION_H, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=IMAGE, patch_size=16)).eval()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[Path, Path]:
    """The "local encoder folders": tiny random BERT (with MiniLM's tokenizer) and CLIP vision tower."""
    root = tmp_path_factory.mktemp("encoders")
    text, vision = root / "text", root / "vision"
    _text_model(0).save_pretrained(text)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, text / name)
    _vision_model(0).save_pretrained(vision)
    (vision / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": IMAGE}, "do_center_crop": True,
        "crop_size": {"height": IMAGE, "width": IMAGE}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3}))
    return text, vision


def _ln(prefix: str, dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=g), f"{prefix}.bias": 0.1 * torch.randn(dim, generator=g)}


def _linear(prefix: str, out: int, inp: int, g: torch.Generator, bias: bool = True) -> dict[str, torch.Tensor]:
    weights = {f"{prefix}.weight": torch.randn(out, inp, generator=g) / math.sqrt(inp)}
    if bias:
        weights[f"{prefix}.bias"] = 0.1 * torch.randn(out, generator=g)
    return weights


def reference_state() -> dict[str, torch.Tensor]:
    """A state dict under the reference's names, with weights unlike the encoder folders' (seeds 1, 2)."""
    g = torch.Generator().manual_seed(7)
    sd: dict[str, torch.Tensor] = {}
    sd.update({f"text_encoder.bert_model.{k}": v for k, v in _text_model(1).state_dict().items()})
    sd["text_encoder.bert_model.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers saved it
    sd.update(_linear("text_encoder.text_proj", D, TEXT_H, g))
    sd.update({f"cv_encoder.image_net.{k}": v for k, v in _vision_model(2).state_dict().items()})
    sd["cv_encoder.image_net.vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    sd.update(_linear("cv_encoder.cv_proj", D, VISION_H, g))
    f = "fusion_module.MergeAtt_layers.0."
    for name in ("query", "key", "value"):
        sd.update(_linear(f"{f}self_att.self.{name}", D, D, g))
    sd.update(_linear(f"{f}self_att.output.dense", D, D, g))
    sd.update(_ln(f"{f}self_att.output.LayerNorm", D, g))
    sd.update(_linear(f"{f}inter.dense", 4 * D, D, g))
    sd.update(_linear(f"{f}output.dense", D, 4 * D, g))
    sd.update(_ln(f"{f}output.LayerNorm", D, g))
    sd["fusion_module.token_type_embeddings.weight"] = torch.randn(2, D, generator=g)
    s = "user_encoder.transformer_encoder."
    sd[f"{s}position_embedding.weight"] = torch.randn(L, D, generator=g)
    sd.update(_ln(f"{s}layer_norm", D, g))
    for b in range(BLOCKS):
        p = f"{s}transformer_blocks.{b}."
        for name in ("w_Q", "w_K", "w_V", "fc"):
            sd.update(_linear(f"{p}multi_head_attention.{name}", D, D, g, bias=False))
        sd.update(_ln(f"{p}multi_head_attention.layer_norm", D, g))
        sd.update(_linear(f"{p}feed_forward.w_1", 4 * D, D, g))
        sd.update(_linear(f"{p}feed_forward.w_2", D, 4 * D, g))
        sd.update(_ln(f"{p}feed_forward.layer_norm", D, g))
    return sd


def save_reference(path: Path, sd: dict[str, torch.Tensor], **extra) -> Path:
    """The reference's checkpoint layout (model, optimizer, RNG and scaler state)."""
    torch.save({"model_state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "rng_state": torch.get_rng_state(), "scaler_state": {"scale": 65536.0, "growth_factor": 2.0},
                **extra}, path)
    return path


# ---- the reference's forward pass, re-implemented from its architecture ----------------------------------------

def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n, d // n).transpose(1, 2)  # (B, n, T, d/n)


def _attend(q, k, v, additive_mask, heads):
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + additive_mask
    out = torch.softmax(scores, dim=-1) @ v  # (B, n, T, d/n)
    return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[3])


def reference_sasrec(sd, x, log_mask):
    s = "user_encoder.transformer_encoder."
    lin = F.linear
    h = F.layer_norm(x + sd[f"{s}position_embedding.weight"][: x.shape[1]], (D,), sd[f"{s}layer_norm.weight"],
                     sd[f"{s}layer_norm.bias"], eps=1e-6)
    allowed = torch.tril((log_mask != 0)[:, None, None, :].expand(-1, 1, x.shape[1], -1))
    mask = torch.where(allowed, 0.0, -1e9)
    for b in range(BLOCKS):
        p = f"{s}transformer_blocks.{b}."
        a = p + "multi_head_attention."
        att = _attend(lin(h, sd[a + "w_Q.weight"]), lin(h, sd[a + "w_K.weight"]), lin(h, sd[a + "w_V.weight"]),
                      mask, SASREC_HEADS)
        h = F.layer_norm(h + lin(att, sd[a + "fc.weight"]), (D,), sd[a + "layer_norm.weight"],
                         sd[a + "layer_norm.bias"], eps=1e-6)
        ff = p + "feed_forward."
        inner = lin(torch.relu(lin(h, sd[ff + "w_1.weight"], sd[ff + "w_1.bias"])), sd[ff + "w_2.weight"],
                    sd[ff + "w_2.bias"])
        h = F.layer_norm(h + inner, (D,), sd[ff + "layer_norm.weight"], sd[ff + "layer_norm.bias"], eps=1e-6)
    return h


def reference_item_vectors(sd, text_ids, text_mask, images):
    def sub(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith("position_ids")}

    text_model, vision_model = _text_model(5), _vision_model(6)
    text_model.load_state_dict(sub("text_encoder.bert_model."))
    vision_model.load_state_dict(sub("cv_encoder.image_net."))
    lin = F.linear
    text = lin(text_model(input_ids=text_ids, attention_mask=text_mask)[0], sd["text_encoder.text_proj.weight"],
               sd["text_encoder.text_proj.bias"])
    image = lin(vision_model(pixel_values=images)[0], sd["cv_encoder.cv_proj.weight"], sd["cv_encoder.cv_proj.bias"])
    pad = torch.cat([text_mask, torch.ones(image.shape[:2], dtype=text_mask.dtype)], dim=1).float()  # (N, T+P)
    x = torch.cat([text, image], dim=1)  # the raw tokens: the reference's type embeddings never get here
    mask = ((1.0 - pad) * -10000.0)[:, None, None, :]
    f = "fusion_module.MergeAtt_layers.0."

    def dense(h, name):
        return lin(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def norm(h, name):
        return F.layer_norm(h, (D,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-12)

    att = _attend(dense(x, f + "self_att.self.query"), dense(x, f + "self_att.self.key"),
                  dense(x, f + "self_att.self.value"), mask, FUSION_HEADS)
    h = norm(x + dense(att, f + "self_att.output.dense"), f + "self_att.output.LayerNorm")
    h = norm(h + dense(F.gelu(dense(h, f + "inter.dense")), f + "output.dense"), f + "output.LayerNorm")
    return (h * pad[..., None]).sum(1) / pad.sum(1, keepdim=True)


# ---- tests ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imported(encoders, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    sd = reference_state()
    ref = save_reference(root / "epoch-0.pt", sd)
    report, _ = import_checkpoint(ref, root / "pmmrec.pt", text_encoder=str(encoders[0]),
                                  vision_encoder=str(encoders[1]))
    return sd, report, root / "pmmrec.pt"


def _model(out: Path) -> PMMRec:
    state = load_checkpoint(out)
    config = load_config(None, base=state["config"])
    model = PMMRec(config, num_items=0)
    model.load_state_dict(state["model"])
    return model.eval()


def test_every_tensor_is_accounted_for(imported):
    sd, report, out = imported
    assert report.unmapped == {} and report.not_in_reference == []
    assert set(report.ignored) == {"text_encoder.bert_model.embeddings.position_ids",
                                   "cv_encoder.image_net.vision_model.embeddings.position_ids"}
    assert set(report.zeroed) == {"fusion_module.token_type_embeddings.weight"}
    assert len(report.mapped) + len(report.ignored) + len(report.zeroed) == len(sd)
    assert set(report.parts) == {"text encoder", "text projection", "vision encoder", "vision projection", "fusion",
                                 "user encoder"}
    state = load_checkpoint(out)
    for theirs, ours in report.mapped.items():
        assert torch.equal(state["model"][ours], sd[theirs]), theirs
    assert state["config"]["model"]["dim"] == D and state["config"]["data"]["max_seq_len"] == L
    assert state["import_report"]["mapped"] == report.mapped


def test_user_encoder_reproduces_the_reference(imported):
    sd, _, out = imported
    model = _model(out)
    torch.manual_seed(0)
    x = torch.randn(3, L, D)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    with torch.no_grad():
        ours = model.encode_sequences(x, mask)
        theirs = reference_sasrec(sd, x, mask)
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)
    assert not torch.allclose(ours[real], reference_sasrec(sd, x.flip(1), mask)[real], atol=1e-3)  # not vacuous


def test_item_encoder_reproduces_the_reference(imported):
    sd, _, out = imported
    model = _model(out)
    torch.manual_seed(1)
    text_ids = torch.randint(1000, 2000, (4, 7))
    text_mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] + [0] * 6])
    images = torch.randn(4, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = model.encode_items(ItemInputs(items=torch.arange(1, 5), text_ids=text_ids, text_mask=text_mask,
                                             images=images))
        theirs = reference_item_vectors(sd, text_ids, text_mask, images)
    assert ours.shape == (4, D)
    assert torch.allclose(ours, theirs, atol=1e-4)
    # Copying the reference's (never applied) type embeddings instead of zeroing them would change every vector.
    with torch.no_grad():
        model.item_encoder.fusion.type_embedding.weight.copy_(sd["fusion_module.token_type_embeddings.weight"])
        copied = model.encode_items(ItemInputs(items=torch.arange(1, 5), text_ids=text_ids, text_mask=text_mask,
                                               images=images))
    assert not torch.allclose(copied, theirs, atol=1e-2)


def test_transfer_accepts_the_imported_checkpoint(imported, encoders, tiny_domain, tmp_path):
    _, _, out = imported
    state = load_checkpoint(out)
    config = transfer_config(state, None, [f"data.domain={tiny_domain}", "transfer.parts=full"], str(out))
    assert config.text.encoder == str(encoders[0]) and config.model.dim == D
    model = PMMRec(config, num_items=6)
    report = init_from(model, str(out), "full")
    assert report.reinitialised == [] and len(report.loaded) == len(state["model"])

    code = main(["transfer", "--from", str(out), f"data.domain={tiny_domain}", f"run.dir={tmp_path / 'run'}",
                 "data.missing_image=blank", "train.max_steps=1", "train.batch_size=4", "text.max_tokens=8",
                 "text.trainable_layers=0", "vision.trainable_layers=0", "eval.ks=[5]"])
    assert code == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"]["exclude_history"]["HR@5"] >= 0


def test_paper_settings_match_the_paper_recipe(repo):
    paper = load_config(repo / "configs" / "paper.yaml")
    for section, values in PAPER.items():
        for key, value in values.items():
            assert getattr(getattr(paper, section), key) == value, f"{section}.{key}"


def test_a_partial_checkpoint_is_refused_unless_allowed(encoders, tmp_path):
    sd = {k: v for k, v in reference_state().items() if not k.startswith("fusion_module.")}
    ref = save_reference(tmp_path / "ref.pt", sd)
    kwargs = dict(text_encoder=str(encoders[0]), vision_encoder=str(encoders[1]))
    with pytest.raises(PmmrecError, match=r"partial import \(0 checkpoint tensors unmapped, 17 model tensors"):
        import_checkpoint(ref, tmp_path / "out.pt", **kwargs)
    assert not (tmp_path / "out.pt").exists()
    report, _ = import_checkpoint(ref, tmp_path / "out.pt", allow_partial=True, **kwargs)
    assert all(k.startswith("item_encoder.fusion.") for k in report.not_in_reference)
    assert len(report.not_in_reference) == 17


def test_unknown_reference_tensors_are_refused(encoders, tmp_path):
    sd = reference_state()
    sd["id_encoder.weight"] = torch.zeros(10, D)  # the reference's ID tower, which pmmrec's paper model lacks
    ref = save_reference(tmp_path / "ref.pt", sd)
    with pytest.raises(PmmrecError, match=r"1 checkpoint tensors unmapped.*id_encoder\.weight"):
        import_checkpoint(ref, tmp_path / "out.pt", text_encoder=str(encoders[0]), vision_encoder=str(encoders[1]))


def test_wrong_encoder_shapes_name_the_tensor(encoders, tmp_path):
    sd = reference_state()
    sd["text_encoder.text_proj.weight"] = torch.zeros(D, 48)  # trained on a 48-wide text encoder
    ref = save_reference(tmp_path / "ref.pt", sd)
    with pytest.raises(PmmrecError, match=r"text_encoder\.text_proj\.weight has shape \(128, 48\) but "
                                          r"item_encoder\.text_proj\.weight has \(128, 32\)"):
        import_checkpoint(ref, tmp_path / "out.pt", text_encoder=str(encoders[0]), vision_encoder=str(encoders[1]))


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_needing_arbitrary_code_is_refused(encoders, tmp_path):
    marker = tmp_path / "pwned"
    ref = save_reference(tmp_path / "ref.pt", reference_state(), args=_System(f"touch {marker}"))
    with pytest.raises(PmmrecError, match=r"weights_only=True.*never unpickles arbitrary objects"):
        import_checkpoint(ref, tmp_path / "out.pt", text_encoder=str(encoders[0]), vision_encoder=str(encoders[1]))
    assert not marker.exists()


def test_map_name_covers_the_reference_layout():
    assert map_name("fusion_module.MergeAtt_layers.0.output.LayerNorm.bias") == (
        "item_encoder.fusion.block.ffn_norm.bias", "fusion")
    assert map_name("fusion_module.MergeAtt_layers.0.self_att.output.dense.weight") == (
        "item_encoder.fusion.block.attn.out.weight", "fusion")
    assert map_name("user_encoder.transformer_encoder.transformer_blocks.1.feed_forward.w_2.bias") == (
        "user_encoder.blocks.1.ffn_out.bias", "user encoder")
    assert map_name("pop_prob_list") is None


def test_cli(imported, encoders, tmp_path, capsys):
    sd, _, _ = imported
    ref = save_reference(tmp_path / "ref.pt", sd)
    code = main(["import-checkpoint", str(ref), "--text-encoder", str(encoders[0]), "--vision-encoder",
                 str(encoders[1]), "--out", str(tmp_path / "out.pt")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "0 unmapped" in out and "zeroed   fusion_module.token_type_embeddings.weight" in out
    assert load_checkpoint(tmp_path / "out.pt")["config"]["model"]["dim"] == D
