"""Every CLI option and positional argument has help text, and no --help page shows
developer notes or raw reST; --workers means one thing everywhere."""

from __future__ import annotations

import argparse
import re

from galleria.cli.main import build_parser

DEV_NOTES = re.compile(r"Wired in|cli/main\.py|``|:func:|:class:|:mod:|\bTODO\b")


def _parsers(p: argparse.ArgumentParser, path: str = "galleria"):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_and_positional_has_help():
    missing = []
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                              argparse._SubParsersAction)):
                continue
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, "no help text: " + ", ".join(missing)


def test_help_pages_have_no_developer_notes_or_rest():
    bad = []
    for path, p in _parsers(build_parser()):
        text = p.format_help()
        m = DEV_NOTES.search(text)
        if m:
            bad.append(f"{path}: {m.group(0)!r}")
    assert not bad, bad


def test_workers_means_decoding_threads_everywhere():
    seen = {}
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if "--workers" in a.option_strings:
                seen[path] = a.help
    assert seen and all("decod" in h for h in seen.values()), seen
