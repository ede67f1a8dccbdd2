"""Hugging Face Hub: push a model folder as one commit, and write a Gradio Space folder (loading a Hub model is
`loading.load_predictor`). Everything goes through huggingface_hub; only safetensors, JSON, Markdown (and the
card's PNG plots) ever travel, and nothing runs remote code.

    python -m cifar_tl.hub push MODEL_DIR user/name [--private] [--message TEXT]
    python -m cifar_tl.hub space [SPACE_DIR] --model user/name|MODEL_DIR [--space user/space --push]
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceCardData, get_token, is_offline_mode
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .console import FlagParser, one_line_errors
from .files import WriteError, atomic_write_text
from .integrity import check_weights

DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.md"]  # what `loading` fetches of a Hub model
UPLOAD_PATTERNS = [*DOWNLOAD_PATTERNS, "*.png"]  # + the card's plots; never pickles, never code
# what running a Space folder locally leaves in it (gradio's caches and flags) is not part of the Space
SPACE_IGNORE = ["__pycache__", "*.pyc", ".gradio/*", "flagged/*"]
PACKAGE_DIR = Path(__file__).resolve().parent


def is_hub_id(text: str) -> bool:
    """`namespace/name`, as the Hub spells a repository (a bare name would land in whichever account is logged
    in)."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1


class HubError(RuntimeError):
    """A Hub operation cannot go ahead (offline, no token, no access, unreachable); the message says what
    to do."""


def check_repo_id(repo_id: str | None, what: str) -> str:
    """A Hub model id must be namespace/name: a bare name would land in whichever account is logged in."""
    if not is_hub_id(repo_id or ""):
        raise HubError(f"{what} {repo_id!r}: not a Hub id user/name")
    return repo_id


# --------------------------------------------------------------------------------------------- pushing


def check_push_access(repo_id: str | None, flag: str = "--hub-model-id") -> str:
    """Fail fast, before any training, unless `repo_id` is a valid user/name the token may write to. Returns
    the Hub user name."""
    repo_id = check_repo_id(repo_id, flag)
    if is_offline_mode():
        later = (", or drop --push-to-hub and push later with `python -m cifar_tl.hub push OUTPUT/model user/name`"
                 if flag == "--hub-model-id" else "")
        raise HubError(f"cannot push to the Hub with HF_HUB_OFFLINE=1: unset it{later}")
    token = get_token()
    if token is None:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write "
                       "access")
    api = HfApi()
    try:
        me = api.whoami(token=token)
    except Exception as err:  # invalid token (401) or an unreachable endpoint: either way, no push possible
        raise HubError(f"cannot check the token with {api.endpoint}: {str(err).splitlines()[0]}") from None
    role = me.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubError(f"the Hugging Face token of {me['name']} is read-only: create one with write access")
    namespaces = {me["name"], *(org["name"] for org in me.get("orgs", []))}
    if repo_id.split("/")[0] not in namespaces:
        raise HubError(f"{flag} {repo_id}: the token belongs to {me['name']}, who can write to "
                       f"{', '.join(sorted(namespaces))} only")
    return me["name"]


def push_model_dir(model_dir: str | Path, repo_id: str, *, private: bool = False,
                   message: str | None = None, flag: str = "--hub-model-id") -> str:
    """Create `repo_id` (if needed) and upload the model folder as one commit; the card is re-rendered first
    so its loading snippets name the repo (and put back as it was when the push fails). `flag` names `repo_id`
    in errors. Returns the commit URL."""
    model_dir = model_folder_of(model_dir)
    config = read_model_folder(model_dir)
    check_pushable(model_dir, config)
    check_push_access(repo_id, flag)
    from .integrity import is_sealed, seal, seal_problem
    from .model_folder import write_card

    card = Path(model_dir) / "README.md"
    before = card.read_text() if card.is_file() else None
    edited = before is not None and is_sealed(card) and seal_problem(card) is not None
    if edited:
        print(f"note: {card} was edited after cifar-tl wrote it: pushed as it is (its loading snippets were not "
              f"changed to name {repo_id}; delete it to have the card written again)", file=sys.stderr)
    else:
        write_card(model_dir, config, repo_id=repo_id)
    api = HfApi()
    try:  # upload_folder has the Hub validate README.md's metadata before any file is sent
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=model_dir, allow_patterns=UPLOAD_PATTERNS,
                                   commit_message=message or default_message(config))
    except Exception as err:
        if before is None:
            card.unlink()
        elif not edited:  # our card as it was, still ours
            atomic_write_text(card, before)
            seal(card)
        retry = f"python -m cifar_tl.hub push {model_dir} {repo_id}"
        raise HubError(f"push to {repo_id} failed ({type(err).__name__}: {str(err).splitlines()[0]}); the "
                       f"model folder is intact: retry with `{retry}`") from None
    return commit.commit_url


def push_finished_run(model_dir: Path, repo_id: str, private: bool = False) -> str:
    """`train.py --push-to-hub` at the end of a run: the commit URL, or a HubError that says the run itself is
    complete and how to push it."""
    try:
        return push_model_dir(model_dir, repo_id, private=private)
    except (HubError, ValueError, FileNotFoundError) as err:
        raise HubError(f"the run finished (its model folder {model_dir} is complete), but the push to {repo_id} "
                       f"failed: {err}; push it with `python -m cifar_tl.hub push {model_dir} {repo_id}`") from None


def model_folder_of(path: str | Path) -> Path:
    """A model folder as it is, or a training run's folder as its model/ (what push and every loader take)."""
    path, run_model = Path(path), Path(path) / "model"
    return run_model if not (path / "config.json").exists() and (run_model / "config.json").is_file() else path


def read_model_folder(model_dir: str | Path) -> dict:
    """config.json of a model folder whose weights are as they were written (read without importing torch): a
    truncated or altered copy is never published."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").is_file() and any(model_dir.glob("*.bin")):
        raise FileNotFoundError(f"{model_dir}: no model.safetensors, only pickled weights (*.bin), which cifar-tl "
                                "never loads or publishes: save the weights as safetensors")
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (needs config.json and model.safetensors)")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{model_dir / 'config.json'} is not valid JSON ({err}); export the folder again") from None
    check_weights(model_dir / "model.safetensors",
                  ((config.get("cifar_tl") or {}).get("files") or {}).get("model.safetensors"))
    return config


def check_pushable(model_dir: Path, config: dict) -> None:
    """What the Hub would get must load: the weights fit the architecture config.json names (a replaced
    safetensors file with its checksum removed passed the header check), the folder is of the current format
    (timm cannot build an older format's architecture names), and no run is still writing it."""
    from .model_folder import FORMAT_VERSION, load_model
    from .processes import holder

    run = model_dir.resolve().parent
    busy = holder(run)
    if busy:
        raise ValueError(f"{model_dir}: the run in {run} is still going ({busy}); push once it has ended")
    version = (config.get("cifar_tl") or {}).get("format_version", FORMAT_VERSION)
    if version < FORMAT_VERSION:
        raise ValueError(f"{model_dir}: written by an older cifar-tl (model-folder format {version}), which timm "
                         f"and transformers cannot load; write it again in format {FORMAT_VERSION} with `python -m "
                         f"cifar_tl.export --checkpoint {model_dir} --output-dir NEW_DIR` and push that")
    try:
        load_model(model_dir)
    except Exception as err:  # weights that do not fit, an architecture this timm lacks: never published
        raise ValueError(f"{model_dir}: cannot be loaded, so it is not pushed ({err})") from None


def default_message(config: dict) -> str:
    extra = config.get("cifar_tl", {})
    run = Path((extra.get("train_config") or {}).get("output_dir") or "export").name
    top1 = (extra.get("metrics") or {}).get("top1")
    score = f", test top-1 {top1:.4f}" if top1 is not None else ""
    return f"cifar-tl run {run}: {config['architecture']}{score}"


# --------------------------------------------------------------------------------------------- Space

SPACE_APP = '''"""Gradio Space: {title}. Spaces runs `python app.py`; so can you (see README.md)."""
import sys
{path_import}
from cifar_tl.demo import main

MODEL = {model}

if __name__ == "__main__":
    # auto: ONNX Runtime on a CPU, the fastest backend measured for this demo (BENCHMARKS.md, demo latency;
    # the graph is exported into the cache on the first start), PyTorch where the export fails or on a GPU
    sys.exit(main(["--model", MODEL, "--backend", "auto"]))
'''
SPACE_README = """---
{{ card_data }}
---

# {{ title }}

A Gradio demo of the CIFAR image classifier {{ source }}: upload or paste an image to get its top-5
classes{{ superclass }}. The `cifar_tl/` folder is a copy of the cifar-tl package, so the Space installs nothing
from git.

Run it locally: `pip install -r requirements.txt gradio=={{ gradio_version }} && python app.py`.
"""


def build_space(space_dir: str | Path, model: str) -> Path:
    """Write a self-contained Gradio Space: README.md (Space metadata), app.py, requirements.txt, a copy of
    the cifar_tl package (with its example images). `model` is a Hub id, or a local model folder copied into the
    Space. app.py calls `cifar_tl.demo.main(["--model", MODEL, "--backend", "auto"])`. The Space runs this
    Python's minor version, so the pinned requirements install there as they did here."""
    space = Path(space_dir)
    local = Path(model).is_dir()
    if not local:
        check_repo_id(model, "--model (a model folder or Hub id)")
        if Path(model).parent.is_dir():  # `runs/cnnx`: a mistyped folder, not a Hub user named "runs"
            raise FileNotFoundError(f"--model {model}: no such folder, though {Path(model).parent}/ is here; give "
                                    "the model folder (or run folder), or a Hub id user/name that is no local path")
    if (space / "cifar_tl").resolve() == PACKAGE_DIR.resolve():
        raise ValueError(f"{space}: the folder this cifar_tl package is in; build the Space in another folder")
    config = None
    if local:  # bundle the weights: the Space then needs no model repo
        model = model_folder_of(model)  # a run's folder: its model/
        config = read_model_folder(model)  # checked before anything is written
    space.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PACKAGE_DIR, space / "cifar_tl", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if local:
        keep = (".safetensors", ".json")
        shutil.copytree(model, space / "model", dirs_exist_ok=True,
                        ignore=lambda _, names: [n for n in names if not n.endswith(keep)])
    title = f"CIFAR classifier: {'bundled model' if local else model}"
    (space / "app.py").write_text(SPACE_APP.format(
        title=title, path_import="from pathlib import Path\n" if local else "",
        model='str(Path(__file__).with_name("model"))' if local else json.dumps(model)))
    (space / "requirements.txt").write_text("\n".join(space_requirements()) + "\n")
    gradio_version = importlib.metadata.version("gradio")
    data = SpaceCardData(title=title, sdk="gradio", sdk_version=gradio_version, app_file="app.py",
                         python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
                         models=None if local else [model], license="apache-2.0", emoji="🖼️",
                         colorFrom="blue", colorTo="green", pinned=False)
    source = "bundled in `model/`" if local else f"[{model}](https://huggingface.co/{model})"
    # a Hub model is not read here (it may not be reachable): its page says whether it has superclasses
    has_coarse = config is None or bool((config.get("cifar_tl") or {}).get("coarse_names"))
    SpaceCard.from_template(data, template_str=SPACE_README, title=title, source=source,
                            superclass=" and superclass" if has_coarse else "",
                            gradio_version=gradio_version).save(space / "README.md")
    return space


def push_space(space_dir: str | Path, space_id: str, *, private: bool = False) -> str:
    """Create the Gradio Space `space_id` (if needed) and upload a Space folder as one commit; returns its URL."""
    check_push_access(space_id, "--space")
    api = HfApi()
    try:
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private or None, exist_ok=True)
        api.upload_folder(repo_id=space_id, repo_type="space", folder_path=space_dir,
                          ignore_patterns=SPACE_IGNORE, commit_message="cifar-tl demo Space")
    except Exception as err:
        raise HubError(f"push of the Space {space_id} failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                       f"the folder {space_dir} is intact: retry with `python -m cifar_tl.hub space {space_dir} "
                       f"--model ... --space {space_id} --push`") from None
    return f"{api.endpoint}/spaces/{space_id}"


def space_requirements() -> list[str]:
    """cifar-tl's runtime dependencies pinned to the versions installed here (the ones tested; local labels such
    as +cu130 dropped, PyPI has none), minus gradio, which the Space's `sdk_version` provides. PyTorch comes
    from its CPU index: a free Space has no GPU, and PyPI's Linux wheel bundles CUDA (several GB)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = ["# PyTorch's CPU wheels (a free Space has no GPU); remove this line on GPU hardware",
            "--extra-index-url https://download.pytorch.org/whl/cpu"]
    for spec in importlib.metadata.requires("cifar-tl") or []:
        req = Requirement(spec)
        if req.marker is None and req.name.lower() != "gradio":
            pins.append(f"{req.name}=={Version(importlib.metadata.version(req.name)).public}")
    return pins


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m cifar_tl.hub", description="Push a model folder to the "
                        "Hugging Face Hub, or build (and push) a Gradio Space that serves it.")
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload a model folder as one commit")
    push.add_argument("model_dir")
    push.add_argument("repo_id", help="user/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--message", help="commit message (default: names the run and its test top-1)")
    space = sub.add_parser("space", help="build a Gradio Space folder for a model, and with --push upload it")
    space.add_argument("space_dir", nargs="?", help="folder to write (default with --push: a temporary one)")
    space.add_argument("--model", required=True, help="Hub id user/name, or a model folder (or run folder) to bundle")
    space.add_argument("--space", help="the Space's Hub id user/name (with --push)")
    space.add_argument("--push", action="store_true", help="create the Space and upload the folder in one commit")
    space.add_argument("--private", action="store_true", help="create the Space private")
    args = parser.parse_args(argv)
    if args.command == "space" and (args.push and not args.space or not args.push and not args.space_dir):
        parser.error("space: --push needs --space USER/SPACE; without --push give the SPACE_DIR to write")

    def run() -> None:
        if args.command == "push":
            print(push_model_dir(args.model_dir, args.repo_id, private=args.private, message=args.message,
                                 flag="repo_id"))
        elif not args.push:
            print(f"wrote {build_space(args.space_dir, args.model)}; run it with `python app.py` there")
        else:
            check_push_access(args.space, "--space")  # before building anything
            with tempfile.TemporaryDirectory() as tmp:
                folder = build_space(args.space_dir or tmp, args.model)
                print(push_space(folder, args.space, private=args.private))

    return one_line_errors(run, HubError, FileNotFoundError, ValueError, WriteError)


if __name__ == "__main__":
    sys.exit(main())
