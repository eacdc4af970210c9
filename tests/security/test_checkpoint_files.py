"""Finding 1 and 6: a checkpoint reads, and a delete removes, only files of its own model.

Bob cannot reach alice's gated weights through names his own checkpoint spells (a shard
index with ``..`` or an absolute name, a link planted in a folder he may load), and a link
planted in the shared cache does not make anyone's delete remove a file outside it.
"""

from __future__ import annotations

import json
import os

from rbee_jupyter.testing.sse import read_stream

from .conftest import ALICE_HF, GATED, PUBLIC, download, error_of, load_events


def _index(weight_file: str, names: list[str]) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, weight_file)}).encode()


def _tensor_names(team) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(team.model / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


async def test_a_shard_index_cannot_name_another_users_gated_weights(team):
    async with team.clients() as c:
        # Given alice's gated model in the shared cache
        r = await c["alice"].post("v1/models/download", json={"model_ref": f"hf:{GATED}"},
                                  headers={"X-HF-Token": ALICE_HF})
        assert r.status_code == 202, r.text
        stream = await read_stream(c["alice"], "GET", f"v1/models/download/progress?id={r.json()['download_id']}",
                                   headers={"Last-Event-ID": "0"}, timeout=120)
        assert stream.events[-1]["stage"] == "complete", stream.events[-1]
        gated = team.snapshot(GATED)
        names = _tensor_names(team)

        # When bob publishes repos holding only an index whose shard names lead into it
        relative = f"../../../models--sec--gated/snapshots/{gated.name}/model.safetensors"
        for repo, name in (("sec/bob-index-dotdot", relative),
                           ("sec/bob-index-absolute", str(gated / "model.safetensors"))):
            team.publish(repo, drop=("model.safetensors",),
                         files={"model.safetensors.index.json": _index(name, names)})
            assert (await download(c["bob"], f"hf:{repo}")).events[-1]["stage"] == "complete"
            r, _ = await load_events(c["bob"], f"hf:{repo}")

            # Then the load is refused before any worker starts, without a word about the target
            error = error_of(r, 400, "INVALID_CHECKPOINT")
            assert "only name files inside its own folder" in error["message"]
            assert error["details"]["file"] == name
        assert [w for w in (await c["admin"].get("v1/workers")).json()["workers"]
                if w["model_ref"].startswith("hf:sec/bob-")] == []


async def test_a_link_planted_in_an_allowed_folder_is_refused(team, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"version": "1.0", "secret": "alice's"}))
    async with team.clients() as c:
        for planted, target in (("tokenizer.json", secret), ("config.json", secret),
                                ("model.safetensors", team.model / "model.safetensors")):
            # Given a folder bob may load whose one file is a link out of it
            folder = team.allowed / f"planted-{planted}"
            folder.mkdir()
            for f in team.model.iterdir():
                (folder / f.name).write_bytes(f.read_bytes()) if f.name != planted else None
            (folder / planted).symlink_to(target)

            # When bob loads it, Then it is refused at once: nothing outside is read
            r, _ = await load_events(c["bob"], f"file://{folder}")
            error = error_of(r, 400, "INVALID_CHECKPOINT")
            assert planted in error["message"] and "resolves outside the folder" in error["message"]

        # A hub snapshot's own links into its repository's blobs are what a download makes: fine
        r, stream = await load_events(c["bob"], f"hf:{PUBLIC}")
        assert r.status_code == 202 and stream.events[-1]["stage"] == "ready", stream.events[-1]
        assert (await c["bob"].delete(f"v1/workers/{r.json()['worker_id']}")).status_code == 204


async def test_delete_leaves_a_planted_link_target_alone(team, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("not the cache's")
    async with team.clients() as c:
        # Given a repo downloaded to the shared cache, with links planted in its snapshot: to a file
        # outside the cache, and to a blob of another repo
        assert (await download(c["bob"], f"hf:{PUBLIC}")).events[-1]["stage"] == "complete"
        team.publish("sec/plantable")
        assert (await download(c["alice"], "hf:sec/plantable")).events[-1]["stage"] == "complete"
        snapshot = team.snapshot("sec/plantable")
        (snapshot / "extra.txt").symlink_to(victim)
        (snapshot / "deep").mkdir()
        (snapshot / "deep" / "x").symlink_to(os.path.relpath(victim, snapshot / "deep"))
        other_blob = (team.snapshot(PUBLIC) / "config.json").resolve()
        (snapshot / "other.bin").symlink_to(other_blob)

        # When an admin deletes the model
        assert (await c["admin"].delete("v1/models", params={"ref": "hf:sec/plantable"})).status_code == 204

        # Then the model is gone, and what the planted links pointed at is still there
        assert not (team.cache / "models--sec--plantable").exists()
        assert victim.read_text() == "not the cache's"
        assert other_blob.is_file()


def test_the_in_process_loader_resolves_names_inside_the_folder(rbee_tiny_model, tmp_path):
    """What ``%rbee`` ``load_model`` in a kernel and the worker run: the same checks, without a hive."""
    import shutil

    import pytest

    from rbee_jupyter.engine.loader import load_model, load_tokenizer, plan_blocks
    from rbee_jupyter.errors import InvalidCheckpoint

    outside = tmp_path / "outside"
    shutil.copytree(rbee_tiny_model, outside)
    names = [k for k in json.loads(_header(outside / "model.safetensors"))]
    cases = {"dotdot": "../outside/model.safetensors", "absolute": str(outside / "model.safetensors"),
             "backslash": "..\\\\outside\\\\model.safetensors", "empty": ""}
    for case, name in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        for f in rbee_tiny_model.iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        (folder / "model.safetensors.index.json").write_bytes(_index(name, names))
        for read in (plan_blocks, load_model):
            with pytest.raises(InvalidCheckpoint, match="may only name files inside its own folder"):
                read(folder)

    # a link to a file inside the folder is fine; a tokenizer that leads out is not
    inside = tmp_path / "inside"
    shutil.copytree(rbee_tiny_model, inside)
    (inside / "weights").mkdir()
    (inside / "model.safetensors").rename(inside / "weights" / "real.safetensors")
    (inside / "model.safetensors").symlink_to("weights/real.safetensors")
    assert len(plan_blocks(inside)) > 0
    (inside / "tokenizer.json").unlink()
    (inside / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(InvalidCheckpoint, match="tokenizer.json"):
        load_tokenizer(inside)


def _header(file) -> bytes:
    import struct

    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return fh.read(n).replace(b'"__metadata__"', b'"__m"')


# --- a single user's own folder (the user is the admin there) --------------------------------------

def test_a_single_user_loads_a_folder_of_links_but_not_a_hub_snapshot_with_one(security_hub, rbee_tiny_model,
                                                                               tmp_path):
    """Links out of a ``file://`` folder are how checkpoints get assembled: on a single-user server
    they load as they always did. A hub snapshot's names come from the hub: confined there too."""
    import asyncio

    from rbee_jupyter.testing.server import ServerProcess

    linked = tmp_path / "assembled"
    linked.mkdir()
    for f in rbee_tiny_model.iterdir():  # every file a link to the real one elsewhere
        (linked / f.name).symlink_to(f)
    settings = {"cache_dir": str(tmp_path / "cache"), "catalog_path": str(tmp_path / "catalog.sqlite"),
                "hub_endpoint": security_hub.url, "hf_token": ALICE_HF, "sse_keepalive_s": 0.5}

    async def scenario(server: ServerProcess) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=server.url + "rbee/", headers=server.auth_header, timeout=60) as c:
            # When the single user loads the folder of links, Then it loads
            r, stream = await load_events(c, f"file://{linked}")
            assert r.status_code == 202, r.text
            assert stream.events[-1]["stage"] == "ready", stream.events[-1]
            assert (await c.delete(f"v1/workers/{r.json()['worker_id']}")).status_code == 204

            # When a link out is planted in a downloaded snapshot, Then that one is still refused
            assert (await download(c, f"hf:{PUBLIC}")).events[-1]["stage"] == "complete"
            (snapshot,) = (tmp_path / "cache" / "models--sec--public" / "snapshots").iterdir()
            (snapshot / "tokenizer.json").unlink()
            (snapshot / "tokenizer.json").symlink_to(rbee_tiny_model / "tokenizer.json")
            r, _ = await load_events(c, f"hf:{PUBLIC}")
            error = error_of(r, 400, "INVALID_CHECKPOINT")
            assert "tokenizer.json" in error["message"] and "resolves outside the folder" in error["message"]

    with ServerProcess(tmp_path / "server", rbee=settings) as server:
        asyncio.run(scenario(server))


def test_the_in_process_loader_follows_links_out_only_when_not_confined(rbee_tiny_model, tmp_path):
    import pytest

    from rbee_jupyter.engine.loader import load_model, load_tokenizer, plan_blocks
    from rbee_jupyter.errors import InvalidCheckpoint

    linked = tmp_path / "assembled"
    linked.mkdir()
    for f in rbee_tiny_model.iterdir():
        (linked / f.name).symlink_to(f)
    assert len(plan_blocks(linked, confined=False)) > 0
    assert load_model(linked, confined=False) is not None and load_tokenizer(linked, confined=False) is not None
    for read in (plan_blocks, load_model, load_tokenizer):  # the default: confined
        with pytest.raises(InvalidCheckpoint, match="resolves outside the folder"):
            read(linked)
    # a shard index spelling '..' or an absolute name is malformed for everyone, confined or not
    (linked / "model.safetensors.index.json").write_bytes(_index("../elsewhere.safetensors", ["x"]))
    with pytest.raises(InvalidCheckpoint, match="absolute names and '..' are not allowed"):
        plan_blocks(linked, confined=False)
    # a hub snapshot is confined whatever the caller says
    snapshot = tmp_path / "models--org--m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for f in rbee_tiny_model.iterdir():
        (snapshot / f.name).symlink_to(f)
    with pytest.raises(InvalidCheckpoint, match="resolves outside the folder"):
        plan_blocks(snapshot, confined=False)


# --- a folder swapped for a link between the check and the read ------------------------------------

def _swap_on_call(monkeypatch, cls, folder, other, seen: list) -> None:
    """Make ``cls.from_pretrained`` swap ``folder`` for a link to ``other`` just before it reads: the
    moment a co-user of a group-writable cache would pick."""
    real = cls.from_pretrained

    def swapped(path, *args, **kwargs):
        seen.append(path)
        if not folder.is_symlink():
            folder.rename(folder.with_name(folder.name + "-moved"))
            folder.symlink_to(other)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", swapped)


def _hostile_copy(source, target, marker: str):
    import shutil

    shutil.copytree(source, target)
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((target / name).read_text())
        data["rbee_marker"] = marker
        data["model_max_length"] = 4242
        (target / name).write_text(json.dumps(data))
    return target


def test_transformers_reads_what_was_checked_not_a_folder_swapped_in_later(rbee_tiny_model, tmp_path, monkeypatch):
    import shutil
    import stat
    import tempfile

    import pytest
    import transformers

    from rbee_jupyter.engine.loader import load_model, load_tokenizer
    from rbee_jupyter.errors import InvalidCheckpoint

    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    other = _hostile_copy(rbee_tiny_model, tmp_path / "attackers", "attacker's")
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig):
        # Given a model folder in a shared place, and a loader past its checks
        folder = tmp_path / "shared" / f"m-{cls.__name__}"
        shutil.copytree(rbee_tiny_model, folder)
        seen: list = []
        with monkeypatch.context() as m:
            m.setattr(tempfile, "tempdir", str(private_tmp))
            _swap_on_call(m, cls, folder, other, seen)

            # When the folder is swapped for a link to the attacker's just before transformers reads it
            if cls is transformers.AutoTokenizer:
                tokenizer = load_tokenizer(folder)
                # Then the tokenizer is the checked folder's own
                assert tokenizer.model_max_length != 4242 and "rbee_marker" not in tokenizer.init_kwargs
            else:
                # Then the config read is the checked one, and the weights, whose folder now is a link,
                # are not read through it
                with pytest.raises(InvalidCheckpoint, match="replaced by a link"):
                    load_model(folder)
        # transformers read a private folder, which is gone
        (copy,) = {str(p) for p in seen}
        assert copy.startswith(str(private_tmp)) and not os.path.exists(copy)
    assert list(private_tmp.iterdir()) == []  # nothing left behind

    # and the private copy is this process's alone while it exists
    from rbee_jupyter.core.confine import private_copy

    with private_copy(rbee_tiny_model) as copy:
        assert stat.S_IMODE(copy.stat().st_mode) == 0o700
        assert {p.name for p in copy.iterdir()} >= {"config.json", "tokenizer.json", "tokenizer_config.json"}
        assert not any(p.name.endswith(".safetensors") for p in copy.iterdir())  # weights are read in place


def test_a_weight_file_behind_a_folder_swapped_for_a_link_is_not_read(rbee_tiny_model, tmp_path):
    import shutil

    import pytest

    from rbee_jupyter.core.checkpoint import checkpoint_files, read_header
    from rbee_jupyter.errors import InvalidCheckpoint

    folder = tmp_path / "shared" / "m"
    shutil.copytree(rbee_tiny_model, folder)
    (resolved,) = checkpoint_files(folder)  # checked
    # the folder on its way is swapped for a link to a look-alike between the check and the read
    folder.rename(tmp_path / "shared" / "moved")
    shutil.copytree(rbee_tiny_model, tmp_path / "look-alike")
    folder.symlink_to(tmp_path / "look-alike")
    with pytest.raises(InvalidCheckpoint, match="replaced by a link"):
        read_header(resolved)
