"""`nearswap-mergekit recipe NAME --pin`: each Hugging Face Hub model of a recipe
becomes org/name@<commit>, which mergekit reads and downloads at that commit.

Nothing here reaches huggingface.co: a stand-in for the Hub's API listens on the
loopback address, and the CLI runs in a subprocess with HF_ENDPOINT pointing at it
(huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported).
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import mergekit_independent, BIN, CONFIGS

# Reading checkpoints and rewriting recipes does not change with mergekit's
# version: these run once, with the mergekit 0.1.5 suite.
pytestmark = mergekit_independent

QUARTET_IDS = [
    "152334H/miqu-1-70b-sf",
    "Sao10K/WinterGoddess-1.4x-70B-L2",
    "sophosympatheia/Aurora-Nights-70B-v1.0",
    "Xwin-LM/Xwin-LM-70B-V0.1",
]
OTHER_IDS = ["org/base", "org/a", "org/lora", "org/tok", "org/new-name"]
#: The commit the stand-in serves for each repository: 40 hex digits, as the Hub's.
COMMITS = {repo_id: hashlib.sha1(repo_id.encode()).hexdigest() for repo_id in QUARTET_IDS + OTHER_IDS}
#: Repositories renamed on the stand-in: the Hub answers for the old name with the new one.
RENAMED = {"org/old-name": "org/new-name"}
HEADER = re.compile(
    r"# Pinned \d{4}-\d\d-\d\d \d\d:\d\d UTC against (\S+): each Hub model is at its commit "
    r"of then \(nearswap-mergekit recipe --pin\)\.\n"
)


def served_config(repo_id: str) -> bytes:
    """config.json of a repository at its commit: a vocabulary size that names it."""
    return json.dumps({"model_type": "llama", "vocab_size": 1000 + sorted(COMMITS).index(repo_id)}).encode()


class StandInHub:
    """The two parts of the Hub's HTTP interface that `--pin` and mergekit use here:
    GET /api/models/ORG/NAME (the model's info, with `sha` its current commit) and
    HEAD/GET /ORG/NAME/resolve/REVISION/config.json (a file at a revision). Unknown
    repositories and revisions get the Hub's 404s; every request is recorded."""

    def __init__(self, commits):
        self.commits = commits
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, request, body: bool):
        path = request.path.split("?")[0]
        self.requests.append((request.command, path))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/config\.json", path)
        if info and RENAMED.get(info[1], info[1]) in self.commits:
            repo_id = RENAMED.get(info[1], info[1])
            self.send(request, 200, json.dumps({"_id": repo_id, "id": repo_id, "sha": self.commits[repo_id],
                                                "private": False, "siblings": []}).encode(), {}, body)
        elif resolve and self.commits.get(resolve[1]) == resolve[2]:
            content = served_config(resolve[1])
            headers = {"X-Repo-Commit": resolve[2], "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
            self.send(request, 200, content, headers, body)
        elif resolve and resolve[1] in self.commits:
            self.send(request, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, body)
        else:
            self.send(request, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)

    @staticmethod
    def send(request, status: int, content: bytes, headers: dict, body: bool):
        request.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(content)),
                            **headers}.items():
            request.send_header(name, value)
        request.end_headers()
        if body:
            request.wfile.write(content)

    def asked_about(self):
        return [path[len("/api/models/"):] for _, path in self.requests if path.startswith("/api/models/")]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def hub():
    with StandInHub(COMMITS) as stand_in:
        yield stand_in


def hub_env(tmp_path: Path, endpoint: str, offline: bool = False) -> dict:
    """The environment of a subprocess that talks to `endpoint` only, with an empty
    Hugging Face home (no stored token, no cache)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def pin(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "nearswap-mergekit"), "recipe", *map(str, args), "--pin"],
                          cwd=cwd, env=env, capture_output=True, text=True)


def pinned(text: str, ids) -> str:
    """`text` with each id written as id@commit, as the test computes it."""
    for repo_id in ids:
        text = re.sub(rf"(?<![\w./-]){re.escape(repo_id)}(?![\w@-])", f"{repo_id}@{COMMITS[repo_id]}", text)
    return text


def body_after_header(output: str, endpoint: str) -> str:
    match = HEADER.match(output)
    assert match, output[:300]
    assert match[1] == endpoint
    return output[match.end():]


def error_lines(result: subprocess.CompletedProcess):
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_quartet_ids_become_id_at_the_commit_the_hub_serves(tmp_path, hub):
    result = pin("quartet", cwd=tmp_path, env=hub_env(tmp_path, hub.url))
    assert result.returncode == 0, result.stderr
    shipped = (CONFIGS / "quartet.yml").read_text()
    # The whole text, comments and layout included, with only the ids changed.
    assert body_after_header(result.stdout, hub.url) == pinned(shipped, QUARTET_IDS)
    assert body_after_header(result.stdout, hub.url) != shipped
    assert sorted(hub.asked_about()) == sorted(QUARTET_IDS)  # once each
    for repo_id in QUARTET_IDS:
        assert f"pinned {repo_id}@{COMMITS[repo_id]}" in result.stderr

    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load(result.stdout))
    revisions = {ref.model.path: ref.model.revision for ref in config.referenced_models()}
    assert revisions == {repo_id: COMMITS[repo_id] for repo_id in QUARTET_IDS}
    assert config.base_model.model.revision == COMMITS["152334H/miqu-1-70b-sf"]


def test_mergekit_fetches_each_pinned_model_at_its_commit(tmp_path, hub):
    """mergekit's own loader (ModelReference.config(), the first thing planning asks
    of a model) requests the pinned commit; the stand-in serves config.json only there."""
    env = hub_env(tmp_path, hub.url)
    result = pin("quartet", "-o", "quartet.yml", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    hub.requests.clear()
    read_configs = (
        "import sys, yaml\n"
        "from mergekit.config import MergeConfiguration\n"
        "config = MergeConfiguration.model_validate(yaml.safe_load(open('quartet.yml')))\n"
        "for ref in config.referenced_models():\n"
        "    print(ref.model.path, ref.config().vocab_size)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", read_configs], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert dict(line.rsplit(" ", 1) for line in loaded.stdout.splitlines()) == {
        repo_id: str(json.loads(served_config(repo_id))["vocab_size"]) for repo_id in QUARTET_IDS}
    fetched = {path for _, path in hub.requests if "/resolve/" in path}
    assert fetched == {f"/{repo_id}/resolve/{COMMITS[repo_id]}/config.json" for repo_id in QUARTET_IDS}


def test_multistage_pins_hub_ids_and_leaves_stage_names(tmp_path, hub):
    result = pin("quartet-multistage", cwd=tmp_path, env=hub_env(tmp_path, hub.url))
    assert result.returncode == 0, result.stderr
    shipped = (CONFIGS / "quartet-multistage.yml").read_text()
    assert body_after_header(result.stdout, hub.url) == pinned(shipped, QUARTET_IDS)
    assert "base_model: quartet-stage1\n" in result.stdout and "base_model: quartet-stage2\n" in result.stdout

    # mergekit-multi's own reader: stage names still name the other stages' outputs.
    from mergekit.scripts.multimerge import load_config

    configs, dependencies = load_config(result.stdout, "/stages")
    assert dependencies == {"quartet-stage1": set(), "quartet-stage2": {"quartet-stage1"},
                            None: {"quartet-stage2"}}
    revisions = {ref.model.path: ref.model.revision
                 for config in configs.values() for ref in config.referenced_models()}
    assert revisions == {**{repo_id: COMMITS[repo_id] for repo_id in QUARTET_IDS},
                         "/stages/quartet-stage1": None, "/stages/quartet-stage2": None}


def test_a_recipe_of_local_paths_is_unchanged_but_for_the_header_and_needs_no_network(tmp_path, hub):
    for name in ("demo-quartet", CONFIGS / "demo-quartet-multistage.yml"):
        result = pin(name, cwd=tmp_path, env=hub_env(tmp_path, hub.url, offline=True))
        assert result.returncode == 0, result.stderr
        shipped = (CONFIGS / (Path(name).stem + ".yml")).read_text()
        assert body_after_header(result.stdout, hub.url) == shipped
    assert hub.requests == []


EDGE_RECIPE = """\
# a comment of the recipe's own
merge_method: nearswap_chain
base_model: "org/base"   # quoted, with a comment after it
models:
  - model: org/kept@0123abc  # already pinned
  - model: 'org/a+org/lora'
  - model: ./here/x
  - model: folder/model
  - model: {model: org/base, override_architecture: LlamaForCausalLM}
tokenizer:
  source: org/tok
  tokens:
    <pad>:
      source: {kind: model_token, model: org/tok, token: "x"}
    <unk>:
      source: {kind: zero}
parameters:
  t: 0.0001
"""


def test_quoting_loras_existing_pins_local_folders_and_tokenizer_sources(tmp_path, hub):
    (tmp_path / "folder" / "model").mkdir(parents=True)  # one slash, but a folder here
    (tmp_path / "edge.yml").write_text(EDGE_RECIPE)
    result = pin("edge.yml", "-o", "out.yml", cwd=tmp_path, env=hub_env(tmp_path, hub.url))
    assert result.returncode == 0, result.stderr
    expected = pinned(EDGE_RECIPE, OTHER_IDS)
    assert 'base_model: "org/base@' in expected and "'org/a@" in expected  # quoting kept
    assert body_after_header((tmp_path / "out.yml").read_text(), hub.url) == expected
    assert result.stdout == ""
    assert "kept org/kept@0123abc: already pinned (line 5)" in result.stderr
    assert sorted(hub.asked_about()) == sorted(set(OTHER_IDS) - {"org/new-name"})

    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load((tmp_path / "out.yml").read_text()))
    refs = [entry.model for entry in config.models]
    assert [(r.model.path, r.model.revision) for r in refs] == [
        ("org/kept", "0123abc"), ("org/a", COMMITS["org/a"]), ("./here/x", None),
        ("folder/model", None), ("org/base", COMMITS["org/base"])]
    assert (refs[1].lora.path, refs[1].lora.revision) == ("org/lora", COMMITS["org/lora"])
    assert refs[4].override_architecture == "LlamaForCausalLM"
    assert config.tokenizer.source.model.revision == COMMITS["org/tok"]
    assert config.tokenizer.tokens["<pad>"].source.model.model.revision == COMMITS["org/tok"]


def test_a_renamed_repository_keeps_the_name_written_and_says_so(tmp_path, hub):
    (tmp_path / "r.yml").write_text("merge_method: nearswap_chain\nbase_model: org/base\n"
                                    "models:\n  - model: org/old-name\n")
    result = pin("r.yml", cwd=tmp_path, env=hub_env(tmp_path, hub.url))
    assert result.returncode == 0, result.stderr
    assert f"  - model: org/old-name@{COMMITS['org/new-name']}\n" in result.stdout
    assert "org/old-name is org/new-name on the Hub now; pinned to its commit" in result.stderr


@pytest.mark.parametrize(
    "model, message",
    [
        ("nobody/no-such-model",
         "Error: nobody/no-such-model is not a folder here, and {url} has no model of that name "
         "(or it is private: log in with `hf auth login`); write a local path as ./PATH"),
        ("models/tiny/base",
         "Error: line 5: 'models/tiny/base' is neither a folder here nor a Hugging Face Hub id "
         "(org/name); write a local path as ./PATH"),
        ("{model: {path: nobody/else}}",
         "Error: line 5: a model written as {{path: ...}} cannot be pinned in place; write it as "
         "one string, org/name"),
    ],
)
def test_a_model_the_hub_does_not_know_exits_2_naming_it_and_writes_nothing(tmp_path, hub, model, message):
    (tmp_path / "r.yml").write_text(
        f"merge_method: nearswap_chain\nbase_model: org/base\nmodels:\n  - model: org/a\n  - model: {model}\n")
    result = pin("r.yml", "-o", "out.yml", cwd=tmp_path, env=hub_env(tmp_path, hub.url))
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == [message.format(url=hub.url)]
    assert not (tmp_path / "out.yml").exists()


def test_offline_exits_2_naming_the_model_and_that_pin_needs_the_network(tmp_path, hub):
    result = pin("quartet", "-o", "out.yml", cwd=tmp_path, env=hub_env(tmp_path, hub.url, offline=True))
    assert result.returncode == 2
    assert error_lines(result) == [
        f"Error: cannot resolve 152334H/miqu-1-70b-sf to a commit: --pin needs the network to ask "
        f"{hub.url}, and HF_HUB_OFFLINE is set"]
    assert not (tmp_path / "out.yml").exists()
    assert hub.requests == []


def test_an_unreachable_hub_exits_2_naming_the_model(tmp_path):
    with socket.socket() as closed:  # a loopback port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = pin("quartet", "-o", "out.yml", cwd=tmp_path, env=hub_env(tmp_path, url))
    assert result.returncode == 2
    # The error's name is the HTTP client's: ConnectError (httpx) or ConnectionError (requests).
    assert len(error_lines(result)) == 1 and re.fullmatch(
        rf"Error: cannot resolve 152334H/miqu-1-70b-sf to a commit: --pin needs the network to ask "
        rf"{re.escape(url)}, which cannot be reached \(\w+\)", error_lines(result)[0]), result.stderr
    assert not (tmp_path / "out.yml").exists()


def test_pin_needs_a_recipe(tmp_path):
    result = subprocess.run([str(BIN / "nearswap-mergekit"), "recipe", "--pin"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--pin needs NAME" in result.stderr
