"""How ``jupyter io`` names options to its users: as the flags they type, not as traits.

Configuration errors are raised by traits and validators, which know a trait's name
(``max_sessions``, ``coordinator_url``); a user typed ``--max-sessions`` or ``--coordinator``.
:func:`flag_names` rewrites a message with the flag of every trait the command has an alias
for; :func:`option_for` gives one trait's flag. Commands catch
:class:`~traitlets.TraitError` while building their config and print the rewritten message
(``jupyter io provider: error: --max-sessions must be positive``) instead of a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["flag_names", "option_for"]


def _traits(aliases: Mapping[Any, Any]) -> dict[str, str]:
    """``{trait name: --flag}`` from a traitlets ``aliases`` table (the first flag wins)."""
    flags: dict[str, str] = {}
    for names, target in aliases.items():
        if not isinstance(target, str):
            continue
        name = names[0] if isinstance(names, tuple) else names
        trait = target.rsplit(".", 1)[-1]
        dashes = "-" if len(name) == 1 else "--"
        flags.setdefault(trait, f"{dashes}{name}")
    return flags


def option_for(trait: str, aliases: Mapping[Any, Any], cls: str = "") -> str:
    """The flag a user types for ``trait`` (``--keypair`` for ``keypair_path``), or
    ``--CLS.trait=...`` when the command has no alias for it."""
    flag = _traits(aliases).get(trait)
    if flag is not None:
        return flag
    return f"--{cls}.{trait}" if cls else trait


def flag_names(message: str, aliases: Mapping[Any, Any]) -> str:
    """``message`` with each trait name the command has a flag for replaced by that flag,
    including traitlets' own "The 'x' trait of a Y instance" phrasing."""
    for trait, flag in sorted(_traits(aliases).items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"The '{trait}' trait of an? \w+ instance", flag, message)
        message = re.sub(rf"(?<![\w.-]){re.escape(trait)}(?![\w-])", flag, message)
    return message
