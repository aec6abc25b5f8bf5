"""`pmmrec pretrain` on the quick world's sources, then `pmmrec transfer` to its target, with tiny encoders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pmmrec.cli import main
from pmmrec.config import load_config
from pmmrec.errors import PmmrecError
from pmmrec.runtime.checkpoint import load_checkpoint
from pmmrec.training import pretrain, transfer
from pmmrec.training.api import build_trainer, fit

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SOURCES = ("books", "films", "games")


def _sources(world) -> str:
    return f"data.sources=[{', '.join(str(world / s) for s in SOURCES)}]"


@pytest.fixture(scope="module")
def pretrained(quick_world, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pretrain") / "run"
    config = load_config(TINY, [_sources(quick_world), f"run.dir={run}", "train.epochs=2",
                                "objectives.use=[rec, nicl, nid, rcl]"])
    results = pretrain(config)
    assert set(results["per_domain"]) == set(SOURCES)
    return run / "checkpoints" / "best.pt"


def test_pretraining_logs_every_objective_and_validates_per_domain(pretrained):
    run = pretrained.parents[1]
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(line["train_terms"]) == {"rec", "nicl", "nid", "rcl"}
    assert all(v > 0 for v in line["train_terms"].values())
    state = load_checkpoint(pretrained)
    assert {k.split(".")[1] for k in state["model"] if k.startswith("heads.")} == {"nicl_text", "nicl_image", "nid", "rcl"}
    ids = state["item_ids"]
    assert all(i.split("/", 1)[0] in SOURCES for i in ids) and len(ids) == len(set(ids)) == 3 * 96
    results = json.loads((run / "results.json").read_text())
    for name in SOURCES:
        assert 0 <= results["per_domain"][name]["test"]["exclude_history"]["NDCG@10"] <= 1
    mean = sum(results["per_domain"][n]["test"]["exclude_history"]["HR@10"] for n in SOURCES) / 3
    assert results["test"]["exclude_history"]["HR@10"] == pytest.approx(mean)


@pytest.mark.parametrize("parts,modality", [("full", "multimodal"), ("item_encoder", "multimodal"),
                                            ("user_encoder", "multimodal"), ("full", "text"), ("full", "vision")])
def test_transfer_loads_exactly_the_requested_parts(pretrained, quick_world, tmp_path, parts, modality):
    run = tmp_path / "run"
    results = transfer(str(pretrained), str(TINY), [f"data.domain={quick_world / 'target'}", f"run.dir={run}",
                                                   "train.max_steps=2", f"transfer.parts={parts}",
                                                   f"model.modality={modality}"])
    assert results["num_items"] == 96 and "test" in results
    report = json.loads((run / "transfer.json").read_text())
    loaded = set(report["loaded"])
    source = load_checkpoint(pretrained)["model"]
    if parts in ("full", "user_encoder"):
        assert any(k.startswith("user_encoder.") for k in loaded)
    if parts in ("full", "item_encoder"):
        assert any(k.startswith("item_encoder.") for k in loaded)
    if parts == "user_encoder":
        assert not any(k.startswith("item_encoder.") for k in loaded)
        assert any(k.startswith("item_encoder.") for k in report["reinitialised"])
    if modality == "text":
        assert "item_encoder.text_proj.weight" in loaded
        assert not any(k.startswith(("item_encoder.vision", "item_encoder.fusion")) for k in loaded)
        assert report["skipped"]["item_encoder.vision_proj.weight"].startswith("not in this model")
    assert not any(k.startswith("heads.") for k in loaded)  # objective heads serve pretraining only
    # Before fine-tuning, a loaded tensor equals the checkpoint's: check via a zero-step transfer.
    fresh = build_trainer(load_config(TINY, [f"data.domain={quick_world / 'target'}", f"run.dir={tmp_path / 'x'}",
                                       f"transfer.parts={parts}", f"model.modality={modality}"]),
                    init=str(pretrained))
    for name in list(loaded)[:5]:
        assert torch.equal(fresh.model.state_dict()[name], source[name])


def test_untransferred_parts_are_reinitialised_deterministically(pretrained, quick_world, tmp_path):
    def build(run):
        config = load_config(TINY, [f"data.domain={quick_world / 'target'}", f"run.dir={run}",
                                    "transfer.parts=user_encoder"])
        return build_trainer(config, init=str(pretrained)).model.state_dict()

    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_part_that_loads_nothing_is_an_error(quick_world, tmp_path):
    # A text-only checkpoint has no vision branch: a vision-only transfer of the item encoder loads nothing of it
    # except... nothing at all of the vision path, and its user encoder is not requested.
    text_run = tmp_path / "text"
    build_trainer(load_config(TINY, [f"data.domain={quick_world / 'books'}", f"run.dir={text_run}", "train.max_steps=1",
                               "model.modality=text"])).fit()
    ckpt = str(text_run / "checkpoints" / "best.pt")
    with pytest.raises(PmmrecError, match="nothing of item_encoder could be loaded"):
        transfer(ckpt, str(TINY), [f"data.domain={quick_world / 'target'}", f"run.dir={tmp_path / 'v'}",
                                   "transfer.parts=item_encoder", "model.modality=vision", "model.fusion=sum"])


def test_id_towers_cannot_transfer_items(quick_world, tmp_path, capsys):
    run = tmp_path / "id"
    build_trainer(load_config(TINY, [f"data.domain={quick_world / 'books'}", f"run.dir={run}", "train.max_steps=1",
                               "model.item_tower=id"])).fit()
    code = main(["transfer", "--from", str(run / "checkpoints" / "best.pt"), f"data.domain={quick_world / 'target'}",
                 f"run.dir={tmp_path / 't'}"])
    assert code == 2 and "cannot be transferred to new items" in capsys.readouterr().err


def test_pretraining_resumes_exactly_with_corruption(quick_world, tmp_path):
    """NID/RCL corruption is drawn from (seed, epoch, batch), so 1 epoch + resume + 1 epoch = 2 epochs."""
    common = [_sources(quick_world), "objectives.use=[rec, nicl, nid, rcl]", "train.schedule=constant",
              "train.warmup_steps=0", "train.patience=10"]
    full = pretrain(load_config(TINY, [*common, f"run.dir={tmp_path / 'full'}", "train.epochs=2"]))
    pretrain(load_config(TINY, [*common, f"run.dir={tmp_path / 'split'}", "train.epochs=1"]))
    resumed = pretrain(load_config(TINY, [*common, f"run.dir={tmp_path / 'split'}", "train.epochs=2"]), resume=True)
    assert resumed["test"] == full["test"] and resumed["steps"] == full["steps"]


def test_per_domain_batches_stay_inside_one_domain(quick_world, tmp_path):
    from pmmrec.data.sources import load_sources

    config = load_config(TINY, [_sources(quick_world), f"run.dir={tmp_path / 'run'}", "data.mix=per_domain",
                                "train.batch_size=32"])
    split, views = load_sources(config)
    trainer = build_trainer(config, split=split, views=views)
    plan = trainer.batches.plan(0)  # window indices (train.windows=all: every user has one or more windows)
    owner = trainer.batches.windows.owner
    domain_of = {int(u): v.name for v in views for u in v.users}
    assert all(len({domain_of[int(owner[w])] for w in batch}) == 1 for batch in plan)
    assert sorted(w for batch in plan for w in batch) == list(range(len(owner)))
    per_domain = [int(np.isin(owner, v.users).sum()) for v in views]
    assert len(owner) > len(split.train)  # whole histories tile into more windows than users
    assert trainer.steps_per_epoch == len(plan) == sum(-(-n // 32) for n in per_domain)
    assert len({domain_of[int(owner[b[0]])] for b in plan[:4]}) > 1  # batch order is shuffled across domains
    mixed = build_trainer(load_config(TINY, [_sources(quick_world), f"run.dir={tmp_path / 'm'}", "train.batch_size=32"]),
                    split=split, views=views).batches.plan(0)
    assert any(len({domain_of[int(owner[w])] for w in batch}) > 1 for batch in mixed)


def test_per_domain_negatives_come_from_the_batch_domain(quick_world, tmp_path, monkeypatch):
    """data.mix=per_domain through the training step: the candidates of in-batch L_rec and the items of L_NICL
    (whose negatives are the batch's other items) all belong to one source domain, batch after batch; with the
    default mix some batch crosses domains."""
    from pmmrec.data.sources import load_sources
    from pmmrec.objectives import next_item, nicl

    seen = []  # per loss call: the domains of the item numbers it scores
    rec, align = next_item.next_item_loss, nicl.nicl_loss

    def domains(items):
        numbers = set(items[items > 0].tolist())
        return {view.name for view in views if numbers & set(view.items.tolist())}

    def recording_rec(states, embs, items, *args, **kwargs):
        seen.append(("rec", domains(kwargs.get("cand_items", items))))
        return rec(states, embs, items, *args, **kwargs)

    def recording_nicl(text, image, items, *args, **kwargs):
        seen.append(("nicl", domains(items)))
        return align(text, image, items, *args, **kwargs)

    monkeypatch.setattr(next_item, "next_item_loss", recording_rec)
    monkeypatch.setattr(nicl, "nicl_loss", recording_nicl)
    common = [_sources(quick_world), "objectives.use=[rec, nicl]", "train.batch_size=32"]
    split, views = load_sources(load_config(TINY, common))
    for mix in ("per_domain", "mixed"):
        seen.clear()
        trainer = build_trainer(load_config(TINY, [*common, f"run.dir={tmp_path / mix}", f"data.mix={mix}"]),
                                split=split, views=views)
        for batch in trainer.batches.epoch(0):
            trainer.loss(batch)
        assert len(seen) == 2 * trainer.steps_per_epoch
        if mix == "per_domain":
            assert all(len(d) == 1 for _, d in seen)
            assert len(set.union(*(d for _, d in seen))) == len(SOURCES)  # every domain trains
        else:
            assert any(len(d) > 1 for _, d in seen)


def test_content_plus_id_transfers_its_content_and_serves_new_items(quick_world, tmp_path):
    """A content+id model: transfer moves the content part (IDs belong to the source catalogue), a new item
    is recommendable at once (its content alone), and another domain is evaluated by content alone."""
    from pmmrec.evaluation.checkpoint import evaluate_checkpoint
    from pmmrec.inference.recommender import NewItem, Recommender

    source = tmp_path / "source"
    fit(load_config(TINY, [f"data.domain={quick_world / 'books'}", f"run.dir={source}", "train.max_steps=2",
                           "model.item_tower=content+id"]))
    ckpt = source / "checkpoints" / "best.pt"
    assert load_checkpoint(ckpt)["model"]["item_encoder.id_embedding.weight"].abs().sum() > 0  # the IDs learned
    target = tmp_path / "target"
    transfer(str(ckpt), str(TINY), [f"data.domain={quick_world / 'target'}", f"run.dir={target}",
                                    "train.max_steps=1"])
    report = json.loads((target / "transfer.json").read_text())
    assert report["skipped"]["item_encoder.id_embedding.weight"].startswith("item IDs belong to the source")
    assert "item_encoder.id_embedding.weight" in report["reinitialised"]
    assert any(k.startswith("item_encoder.text") for k in report["loaded"])

    rec = Recommender.from_checkpoint(ckpt)
    assert rec.can_add_items
    history = [rec.catalogue.snapshot().ids[k] for k in (1, 2, 3)]
    rec.add_items([NewItem("fresh", title="a brand new item")])
    assert "fresh" in rec and len(rec.recommend(history, k=5)) == 5
    other = evaluate_checkpoint(str(ckpt), [f"data.domain={quick_world / 'target'}"], splits=["test"])
    assert 0.0 <= other["test"]["exclude_history"]["NDCG@10"] <= 1.0


def test_pretrain_objectives_default_to_the_recipes_pretrain_list(quick_world, tmp_path):
    """`pmmrec pretrain` without --objectives trains the recipe's objectives.pretrain (all four by default, rec alone
    in the real-data recipes); --objectives overrides it."""
    for recipe in ("real-cpu.yaml", "real-gpu.yaml"):
        assert load_config(REPO / "configs" / recipe).objectives.pretrain == ["rec"]
    common = [_sources(quick_world), "train.max_steps=1", "model.fusion=sum"]
    cases = {"default": ([], ["rec", "nicl", "nid", "rcl"]),
             "recipe": (["objectives.pretrain=[rec, nid]"], ["rec", "nid"]),
             "flag": (["--objectives", "rec,rcl", "objectives.pretrain=[rec, nid]"], ["rec", "rcl"])}
    for name, (extra, expected) in cases.items():
        run = tmp_path / name
        assert main(["pretrain", "-c", str(TINY), *extra, *common, f"run.dir={run}"]) == 0
        assert load_config(run / "config.yaml").objectives.use == expected
        line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert set(line["train_terms"]) == set(expected)
