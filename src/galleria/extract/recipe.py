"""A gallery's recipe: the spaces a new image of an existing gallery is embedded into.

A gallery records, per space, the config of the extractor that filled it
(:mod:`galleria.extract.spaces`). Adding images to an existing gallery must use
those extractors -- the same model, transform, fusion model and local features --
or the new images land in a space nobody searches. :func:`recipe_spaces` is the
pure rule (the same one the service applies to uploads):

- every space holding data, plus the primary space, except derived spaces (filled from
  their base space's vectors, :mod:`galleria.extract.derived`) and retired ones;
- during an *online* upgrade, the new model's space instead of the old one (an
  image already in the old space is left to the upgrade run, which moves it);
  during a *shadow* upgrade, the old spaces only (the run adds the new vectors).

:func:`check_explicit` refuses a model given on the command line that would make a
space the gallery does not have (a second space nobody searches), unless the
caller asks for a new space on purpose (``add_space``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from galleria.errors import CompatibilityError, InputError
from galleria.extract.derived import is_derived
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.store.state import GalleryState, SpaceState

UPGRADE_KEY = "upgrade"
"""The gallery setting of an upgrade job (``galleria.upgrade.state.STATE_KEY``; named
here because ``upgrade`` imports ``extract``)."""


@dataclass(frozen=True)
class Recipe:
    """The spaces to embed new images into, with what to skip.

    Attributes:
        spaces: the target spaces, in the gallery's order (global before local as
            registered).
        done_if_in: an image that already has data in one of these spaces counts as
            done for every target space (during an online upgrade: the old space;
            the upgrade run moves it).
        reason: a short description for reports.
    """

    spaces: tuple[SpaceState, ...]
    done_if_in: tuple[str, ...] = ()
    reason: str = "the gallery's spaces"
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(s.space for s in self.spaces))


def recipe_spaces(state: GalleryState) -> Recipe | None:
    """The recipe of a gallery in ``state`` (``None`` for a gallery with no space yet)."""
    targets = [s for s in state.spaces
               if (s.count > 0 or s.space == state.primary) and not is_derived(s.info)]
    if not targets:
        return None
    up = state.setting(UPGRADE_KEY)
    if isinstance(up, dict) and up.get("old_space") and up.get("new_space"):
        old, new = str(up["old_space"]), str(up["new_space"])
        if up.get("mode", "online") == "online":
            names = [s for s in targets if s.space != old]
            if state.space(new) is not None and all(s.space != new for s in names):
                names.insert(0, state.space(new))  # type: ignore[arg-type]
            return Recipe(tuple(names), done_if_in=(old,), reason="online upgrade: new model")
        return Recipe(tuple(s for s in targets if s.space != new),
                      reason="shadow upgrade: old model")
    return Recipe(tuple(targets))


def recipe_extractor(space: SpaceState, *, root: str | os.PathLike[str], runtime: str = "auto",
                     threads: int | None = None) -> Extractor:
    """Rebuild the extractor that fills ``space`` from its record.

    Raises:
        InputError: the space records no extractor config (its vectors were added by
            hand): galleria cannot embed new images into it.
    """
    if not isinstance(space.info.get("config"), dict):
        raise InputError(
            f"space {space.space!r} of {root} records no extractor config (its vectors were "
            "added directly, not by `galleria index`): galleria cannot embed new images into "
            "it. Add them with Gallery.add, or index into a new gallery")
    return extractor_from_space(space.info, root=root, runtime=runtime, threads=threads)


def check_explicit(state: GalleryState, recipe: Recipe, fingerprints: Sequence[str], *,
                   add_space: bool) -> list[str]:
    """The explicitly requested spaces that the gallery does not have yet.

    Raises:
        CompatibilityError: one of them is new and ``add_space`` is false; the
            message names the requested model, the gallery's and ``--add-space``.
    """
    known = {s.space for s in state.spaces}
    new = [fp for fp in fingerprints if fp not in known]
    if new and not add_space:
        have = ", ".join(recipe.names) or "none"
        raise CompatibilityError(
            f"{state.path} is embedded with {have}; the model given ({', '.join(new)}) would "
            "make a second space that this gallery's searches do not use, and the new images "
            "would not be found. Drop --model/--local/--transform/--fusion to embed with the "
            "gallery's own recipe, or pass --add-space (add_space=True) to add that space on "
            "purpose (then index the earlier images again to fill it)")
    return new
