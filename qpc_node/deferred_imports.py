"""Modules two dependencies import at their top but use only on paths an idle node never takes.

A router pays for every imported module in RSS for weeks, and in start time at every boot.
Two of qpc's dependencies import modules at their top that a node uses only on rare paths:

* ``aioquic.tls`` imports pyOpenSSL (for ``X509Store``), service_identity (host name checks)
  and certifi (the web's CA bundle). qpc turns aioquic's own peer check off (our TLS context
  subclass runs the pin / node-id / CA policy) and reaches those three only through
  ``aioquic.tls.verify_certificate``, which ``qpc_node.quic.tls._verify_chain`` calls when a
  federation peer's chain is checked against a community CA (managed mode). A mesh node that
  trusts node ids and pins never calls it.
* protobuf's ``descriptor_pool`` and ``internal.builder`` (which every generated ``_pb2``
  module runs) import ``internal.python_message``, and with it ``text_format`` and the pure
  Python codec. With the upb backend the messages are C objects: ``python_message`` serves
  only the pure-Python backend (the armv7 package uses it; there nothing is deferred) and a
  Python ``DescriptorPool`` made by hand.

:func:`import_deferring` imports such a module with a placeholder standing in for each of
those. A placeholder imports the real module the first time one of its attributes is read
(``crypto.X509Store``, ``certifi.where``, ``python_message._AttachFieldHelpers``) and answers
from it, so every path works exactly as before; the placeholders leave ``sys.modules`` as soon
as the import is done, so any other importer gets the real modules. docs/performance.md
("Round 4") has what each saves; ``tests/unit/test_deferred_imports.py`` checks that a node
does not load them, that the deferred paths still work, and that the dependencies still import
them the way this module expects (it fails loudly on an upgrade that changes that).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence

AIOQUIC_TLS_DEFERRED = ("OpenSSL", "OpenSSL.crypto", "service_identity", "certifi")
"""What ``aioquic.tls`` imports at its top and uses only inside ``verify_certificate``."""

PROTOBUF_DEFERRED = ("google.protobuf.internal.python_message",)
"""What protobuf's pool and builder import at their top and use only without upb."""

PROTOBUF_IMPORTS = (
    "google.protobuf.descriptor_pool",
    "google.protobuf.internal.builder",
    "google.protobuf.message_factory",
)


class _Deferred(types.ModuleType):
    """Stands in for module ``__name__`` until an attribute is read; then imports the real one."""

    def __getattr__(self, name: str) -> object:
        # Dunders are asked by the import machinery (``__path__``, ``__spec__``) while the
        # placeholder is still in sys.modules: answering them must not import the real module.
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:
            # Read while its importer still runs (a module-level use): load the real one now.
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def import_deferring(targets: Sequence[str], deferred: Sequence[str]) -> bool:
    """Import ``targets`` with placeholders for ``deferred``; False if there was nothing to save.

    Nothing is deferred when there is nothing to defer, when a target is already imported
    (its imports are done) or when a deferred module is already loaded (it costs nothing
    more).
    """
    if not deferred or any(name in sys.modules for name in (*targets, *deferred)):
        for name in targets:
            importlib.import_module(name)
        return False
    placeholders = {name: _Deferred(name) for name in deferred}
    for name, placeholder in placeholders.items():
        parent, _, child = name.rpartition(".")
        if parent in placeholders:  # ``from OpenSSL import crypto`` reads the package's attribute
            setattr(placeholders[parent], child, placeholder)
    sys.modules.update(placeholders)
    try:
        for name in targets:
            importlib.import_module(name)
    finally:
        for name, placeholder in placeholders.items():
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]
    return True


def import_aioquic_tls() -> bool:
    """``import aioquic.tls`` with its chain verifier's dependencies deferred."""
    return import_deferring(("aioquic.tls",), AIOQUIC_TLS_DEFERRED)


def import_protobuf_runtime() -> bool:
    """Import what generated ``_pb2`` modules run, without the pure-Python codec under upb."""
    from google.protobuf.internal import api_implementation

    # The pure-Python backend *is* python_message: nothing to defer there.
    pure = api_implementation.Type() == "python"
    return import_deferring(PROTOBUF_IMPORTS, () if pure else PROTOBUF_DEFERRED)
