"""Finding weights on disk or in the Hugging Face cache, downloading only what is missing.

    paths = fetch_weights()                        # MemFlow's five files (see `REPOS`)
    paths = fetch_weights(local_dir="/data/memflow")
    tae = fetch_tae()                              # the TAE decoder's one file

One downloader serves both: a repo's needed files are fetched with
`huggingface_hub.snapshot_download(allow_patterns=...)`, or `hf_hub_download` when a repo gives
one file. A complete local copy is used without the network; offline (HF_HUB_OFFLINE=1) or when
a download fails, one WeightsNotFound lists every missing file and the `hf download` commands.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import WeightsNotFound

__all__ = ["RepoFiles", "REPOS", "WeightPaths", "TAE_REPO", "TAE_FILENAME", "tae_files", "hf_download_command",
           "download", "fetch_weights", "fetch_tae"]


@dataclass(frozen=True)
class RepoFiles:
    """What is needed from one hub repo: patterns to fetch and the files it then reads."""

    repo_id: str
    folder: str  # its folder under local_dir ("" for local_dir itself)
    patterns: tuple[str, ...]  # allow_patterns for snapshot_download
    required: tuple[str, ...]  # files that must exist afterwards

    @property
    def single_file(self) -> bool:
        """One plain file is needed: fetched with hf_hub_download, named as such in commands."""
        return len(self.patterns) == 1 and not any(c in self.patterns[0] for c in "*?[")


REPOS = (
    RepoFiles("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B",
              ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*"),
              ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json")),
    RepoFiles("KlingTeam/MemFlow", "MemFlow", ("base.pt", "lora.pt"), ("base.pt", "lora.pt")),
)

TAE_REPO = "lightx2v/Autoencoders"  # mirrored as daydreamlive/Autoencoders
TAE_FILENAME = "taew2_1.pth"


def tae_files(repo: str = TAE_REPO, filename: str = TAE_FILENAME) -> RepoFiles:
    """The TAE decoder's file; a local_dir holds it directly (no subfolder)."""
    return RepoFiles(repo, "", (filename,), (filename,))


@dataclass(frozen=True)
class WeightPaths:
    """Where each file MemFlow reads lies on disk."""

    base: Path
    lora: Path
    text_encoder: Path
    tokenizer_dir: Path
    vae: Path


def hf_download_command(repo: RepoFiles, patterns: Sequence[str] | None = None, revision: str | None = None,
                        local_dir=None) -> str:
    """The `hf download` command line that fetches `patterns` (default: all) of `repo`."""
    patterns = repo.patterns if patterns is None else patterns
    cmd = f"hf download {repo.repo_id}"
    cmd += f" {patterns[0]}" if repo.single_file else "".join(f' --include "{p}"' for p in patterns)
    if revision:
        cmd += f" --revision {revision}"
    if local_dir is not None:
        cmd += f' --local-dir "{Path(local_dir) / repo.folder}"'
    return cmd


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; also honour a value set later.
    import huggingface_hub
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or huggingface_hub.is_offline_mode()


def _revision_of(revision, repo: RepoFiles, repos: Sequence[RepoFiles]) -> str | None:
    if not isinstance(revision, dict):
        return revision
    known = {r.repo_id for r in repos} | {r.folder for r in repos}
    stray = sorted(set(revision) - known)
    if stray:
        raise ValueError(f"revision has keys {stray}; use the repo ids {[r.repo_id for r in repos]}")
    return revision.get(repo.repo_id, revision.get(repo.folder))


def _missing(folder: Path, repo: RepoFiles) -> list[str]:
    return [f for f in repo.required if not (folder / f).is_file()]


def _pattern_of(repo: RepoFiles, required: str) -> str:
    return next(p for p in repo.patterns if p == required or (p.endswith("/*") and required.startswith(p[:-1])))


def _get(repo: RepoFiles, revision, folder: Path | None, offline: bool) -> Path:
    """The folder holding the repo's files once fetched (a hub cache snapshot when folder is None)."""
    import huggingface_hub

    if repo.single_file:
        file = huggingface_hub.hf_hub_download(repo.repo_id, repo.patterns[0], revision=revision,
                                               local_dir=folder, local_files_only=offline)
        return Path(file).parents[len(Path(repo.patterns[0]).parts) - 1]  # the folder above its path
    return Path(huggingface_hub.snapshot_download(repo.repo_id, allow_patterns=list(repo.patterns),
                                                  revision=revision, local_dir=folder, local_files_only=offline))


def download(repos: Sequence[RepoFiles], local_dir: str | os.PathLike | None = None,
             revision: str | dict | None = None, *, progress: bool = True, needed_by: str = "MemFlow",
             retry: str = "load") -> list[Path]:
    """Each repo's folder, holding its `required` files; only what is missing is downloaded.

    local_dir: a folder with one subfolder per repo (`RepoFiles.folder`); complete copies are used
        without touching the network, missing files are downloaded into it. None: the Hugging
        Face cache (HF_HOME / HF_HUB_CACHE).
    revision: a commit / tag / branch for every repo, or {repo_id: revision}.
    needed_by, retry: who needs the files and what to call again, for the message.
    Raises one WeightsNotFound listing every missing file and the `hf download` commands.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    offline, folders, problems = _offline(), [], []
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        for repo in repos:
            rev = _revision_of(revision, repo, repos)
            folder = Path(local_dir) / repo.folder if local_dir is not None else None
            reason = None
            if folder is None or _missing(folder, repo):
                if offline and folder is not None:
                    reason = "offline (HF_HUB_OFFLINE is set), so nothing was downloaded"
                else:
                    try:
                        folder = _get(repo, rev, folder, offline)
                    except Exception as e:  # reported below, with every other missing file
                        reason = ("offline (HF_HUB_OFFLINE is set) and not in the hub cache" if offline else
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            missing = list(repo.required) if folder is None else _missing(folder, repo)
            if missing:
                problems.append((repo, rev, folder, missing, reason or "the download did not provide them"))
            folders.append(folder)
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    if problems:
        raise WeightsNotFound(_missing_message(problems, local_dir, needed_by, retry))
    return folders


def _missing_message(problems, local_dir, needed_by: str, retry: str) -> str:
    again = f"then call {retry} again" + (" with the same local_dir" if local_dir is not None else "")
    commands = [hf_download_command(repo, list(dict.fromkeys(_pattern_of(repo, f) for f in missing)), rev, local_dir)
                for repo, rev, folder, missing, reason in problems]
    if len(problems) == 1 and len(problems[0][3]) == 1:  # one file: three lines
        repo, rev, folder, missing, reason = problems[0]
        where = (f"{folder / missing[0]}" if local_dir is not None else
                 f"{repo.repo_id}/{missing[0]} in the Hugging Face cache")
        return f"{needed_by} needs {where}, which is missing ({reason}). Get it with:\n  {commands[0]}\n{again}."
    n = sum(len(p[3]) for p in problems)
    where = f"in {local_dir}" if local_dir is not None else "in the Hugging Face cache"
    lines = [f"{needed_by} needs {n} file(s) that are not {where}:"]
    for repo, rev, folder, missing, reason in problems:
        base = folder if folder is not None else repo.repo_id
        lines += [f"  {base}/{f}" for f in missing] + [f"    ({repo.repo_id}: {reason})"]
    lines.append(f"Get them with ({again}):")
    return "\n".join(lines + [f"  {c}" for c in commands])


def fetch_weights(local_dir: str | os.PathLike | None = None, revision: str | dict | None = None, *,
                  progress: bool = True, skip: Sequence[str] = ()) -> WeightPaths:
    """Find MemFlow's files (`REPOS`), downloading only what is missing, and return their paths.

    local_dir: a folder holding `Wan2.1-T2V-1.3B/` and `MemFlow/` (README, "Using a local copy").
    skip: files the caller has from elsewhere (e.g. the text encoder as an fp8 file): neither
    fetched nor required. See `download` for the rest.
    """
    repos = [RepoFiles(r.repo_id, r.folder, tuple(p for p in r.patterns if p not in skip),
                       tuple(f for f in r.required if f not in skip)) for r in REPOS]
    wan, mf = download(repos, local_dir, revision, progress=progress)
    return WeightPaths(base=mf / "base.pt", lora=mf / "lora.pt", text_encoder=wan / "models_t5_umt5-xxl-enc-bf16.pth",
                       tokenizer_dir=wan / "google" / "umt5-xxl", vae=wan / "Wan2.1_VAE.pth")


def fetch_tae(repo: str = TAE_REPO, filename: str = TAE_FILENAME, revision: str | None = None,
              local_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path of the TAE decoder's file: `<local_dir>/<filename>`, or the hub cache's copy."""
    (folder,) = download([tae_files(repo, filename)], local_dir, revision, progress=progress,
                         needed_by="The TAE decoder", retry="load_tae")
    return folder / filename
