"""Keep the compiled module on the model's current members.

The generated GraphModules reach the model's parameters, buffers and submodules by
``get_attr``/``call_module`` targets (``"layer1.0.conv1.weight"``). GraphModules copy
those references when they are built, so a member replaced later
(``model.conv1.weight = nn.Parameter(...)``, ``load_state_dict(sd, assign=True)``,
``torch.func.functional_call``) would be missed. This module:

* :func:`structure` fingerprints the module tree (names and identities): a
  change means the model must be traced and analysed again;
* :class:`Binding` fingerprints every member a GraphModule fetches (identity and shape)
  and, when identities change, writes the current members into the GraphModule in
  place (no code is regenerated). Members go into the same kind of slot they occupy
  in the model (``_parameters``, ``_buffers``, ``_modules``), so a plain tensor that
  ``functional_call`` puts in a ``_parameters`` slot is still differentiated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

_SLOTS = ("_modules", "_parameters", "_buffers")


def structure(root: nn.Module) -> tuple:
    """The module tree below ``root``: (path, identity) of every submodule (train flags
    are not part of it: programs are cached per mode)."""
    return tuple((name, id(m)) for name, m in root.named_modules() if name)


def targets(graph: fx.Graph, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The member paths that ``graph`` fetches, in graph order."""
    found = dict.fromkeys(
        str(n.target) for n in graph.nodes if n.op in ("get_attr", "call_module") and n.target not in skip
    )
    return tuple(found)


def fetch(root: nn.Module, path: str) -> Any:
    """``root.<path>``, reading registered members first (a wrapper's attributes never
    shadow the model's own submodules)."""
    obj: Any = root
    for atom in path.split("."):
        obj = _member(obj, atom)
    return obj


def _member(obj: Any, atom: str) -> Any:
    if isinstance(obj, nn.Module):
        for slot in _SLOTS:
            members = obj.__dict__[slot]
            if atom in members:
                return members[atom]
    return getattr(obj, atom)


def _slot(owner: Any, atom: str) -> str | None:
    if isinstance(owner, nn.Module):
        for slot in _SLOTS:
            if atom in owner.__dict__[slot]:
                return slot
    return None


class Binding:
    """The members one GraphModule fetches from ``root``, kept current by :meth:`refresh`."""

    def __init__(self, gm: fx.GraphModule, root: nn.Module, paths: tuple[str, ...]):
        self.gm, self.root, self.paths = gm, root, paths
        self.identities: tuple = ()
        self.shapes: tuple = ()

    def current(self) -> tuple[tuple, tuple]:
        """(identities, tensor shapes) of the members as the model holds them now."""
        values = [fetch(self.root, p) for p in self.paths]
        shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values)
        return tuple(id(v) for v in values), shapes

    def refresh(self) -> bool:
        """Write the current members into the GraphModule if any identity changed.
        Returns False (and changes nothing) if a tensor changed shape: the model
        must then be compiled again."""
        identities, shapes = self.current()
        if identities == self.identities:
            return True
        if self.shapes and shapes != self.shapes:
            return False
        for path in self.paths:
            self._assign(path)
        self.identities, self.shapes = identities, shapes
        return True

    def _assign(self, path: str) -> None:
        *parents, atom = path.split(".")
        owner_path = ".".join(parents)
        owner = fetch(self.root, owner_path) if parents else self.root
        target: Any = self.gm
        for part in parents:
            target = _member(target, part)
        if target is owner:  # a shared submodule of the model: already live
            return
        value = fetch(self.root, path)
        for slot in _SLOTS:
            target.__dict__[slot].pop(atom, None)
        target.__dict__.pop(atom, None)
        slot = _slot(owner, atom) or ("_buffers" if isinstance(value, torch.Tensor) else None)
        if slot is None:
            object.__setattr__(target, atom, value)
        else:
            target.__dict__[slot][atom] = value


def snapshot(root: nn.Module) -> tuple:
    """Every tensor slot below ``root``: (module, slot, name, tensor), for :func:`restored`."""
    return tuple(
        (m, slot, name, t)
        for m in root.modules()
        for slot in ("_parameters", "_buffers")
        for name, t in m.__dict__[slot].items()
    )


@contextlib.contextmanager
def restored(entries: tuple) -> Iterator[None]:
    """Put the tensors of a :func:`snapshot` back for the duration (the backward pass
    recomputes tiles with the members of its forward pass, as autograd would have saved
    them, even if ``functional_call`` or an assignment replaced them since)."""
    changed = []
    for module, slot, name, tensor in entries:
        members = module.__dict__[slot]
        if members.get(name) is not tensor:
            changed.append((members, name, members.get(name)))
            members[name] = tensor
    try:
        yield
    finally:
        for members, name, tensor in reversed(changed):
            members[name] = tensor
