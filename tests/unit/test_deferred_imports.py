"""Modules a node does not load until a rare path needs them (qpc_node/deferred_imports.py).

Each case runs in a fresh interpreter: the test process has imported everything already, so
nothing would be deferred in it. The checks are both ways: an idle node does not load them,
and the paths that need them (a community-CA chain check; protobuf's text format, which upb
asks ``text_format`` for) still work through the placeholders, loading the real module then.
The last tests pin how the dependencies import them: an upgrade that changes it fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fresh_interpreter import run_fresh

from qpc_node.deferred_imports import (
    AIOQUIC_TLS_DEFERRED,
    PROTOBUF_DEFERRED,
    PROTOBUF_IMPORTS,
    import_deferring,
)


def _run(code: str) -> dict[str, object]:
    result: dict[str, object] = run_fresh(code)
    return result


def test_a_node_loads_neither_the_chain_verifier_deps_nor_the_python_codec() -> None:
    result = _run(
        "import sys, qpc_node.node\n"
        "from google.protobuf.internal import api_implementation\n"
        f"RESULT = {{'loaded': [m for m in {(*AIOQUIC_TLS_DEFERRED, *PROTOBUF_DEFERRED)!r}"
        " if m in sys.modules], 'impl': api_implementation.Type()}"
    )
    assert result["impl"] == "upb"  # the development venv and the x86_64/aarch64 bundles
    assert result["loaded"] == []


def test_a_community_ca_chain_is_still_checked_through_the_placeholders() -> None:
    result = _run(
        "import sys\n"
        "from qpc_node.quic.testing import make_test_pki\n"
        "from qpc_node.quic.tls import CertificateRejected, _verify_chain\n"
        "from cryptography import x509\n"
        "from cryptography.x509.oid import ExtendedKeyUsageOID as EKU\n"
        "before = 'OpenSSL' in sys.modules\n"
        "pki = make_test_pki()\n"
        "from cryptography.hazmat.primitives.serialization import Encoding\n"
        "def der(creds):\n"
        "    return [creds.certificate.public_bytes(Encoding.DER)]\n"
        "_verify_chain(der(pki.client), pki.ca.certificate_pem, purpose=EKU.CLIENT_AUTH)\n"
        "kinds = []\n"
        "for creds in (pki.other_ca_client, pki.expired_client):\n"
        "    try:\n"
        "        _verify_chain(der(creds), pki.ca.certificate_pem, purpose=EKU.CLIENT_AUTH)\n"
        "    except CertificateRejected as exc:\n"
        "        kinds.append(exc.kind)\n"
        "RESULT = {'before': before, 'after': 'OpenSSL.crypto' in sys.modules, 'kinds': kinds}"
    )
    assert result == {
        "before": False,
        "after": True,
        "kinds": ["unknown_ca", "certificate_expired"],
    }


def test_protobuf_text_format_and_the_codec_still_work() -> None:
    result = _run(
        "import sys\n"
        "from qpc_node.wire.gen.qpc.v1 import envelope_pb2\n"
        "before = 'google.protobuf.internal.python_message' in sys.modules\n"
        "m = envelope_pb2.Envelope(ciphertext=b'x', hop_limit=3)\n"
        "again = envelope_pb2.Envelope.FromString(m.SerializeToString())\n"
        "from google.protobuf import text_format\n"
        "RESULT = {'before': before, 'same': again == m, 'text': text_format.MessageToString(m)}"
    )
    assert result == {"before": False, "same": True, "text": 'hop_limit: 3\nciphertext: "x"\n'}


def test_a_placeholder_answers_from_the_real_module_and_leaves_sys_modules(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "dep.py").write_text("VALUE = 42\n")
    (pkg / "lazy.py").write_text("from pkg import dep\n\ndef read():\n    return dep.VALUE\n")
    (pkg / "eager.py").write_text("from pkg import dep\n\nAT_IMPORT = dep.VALUE\n")
    code = (
        f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
        "from qpc_node.deferred_imports import import_deferring\n"
        "took = import_deferring(('pkg.lazy',), ('pkg.dep',))\n"
        "import pkg.lazy as lazy\n"
        "left = 'pkg.dep' in sys.modules\n"
        "value = lazy.read()\n"
        "RESULT = {'took': took, 'left': left, 'value': value, 'loaded': 'pkg.dep' in sys.modules,\n"
        "          'real': type(sys.modules['pkg.dep']).__name__}\n"
    )
    result = _run(code)
    assert result == {"took": True, "left": False, "value": 42, "loaded": True, "real": "module"}
    # A module-level use loads the real module at once (no saving, nothing breaks).
    eager = _run(code.replace("pkg.lazy", "pkg.eager").replace("lazy.read()", "lazy.AT_IMPORT"))
    assert eager == {"took": True, "left": True, "value": 42, "loaded": True, "real": "module"}


def test_nothing_is_deferred_once_a_target_is_imported() -> None:
    import aioquic.tls  # noqa: F401  (imported by this process already)

    assert import_deferring(("aioquic.tls",), AIOQUIC_TLS_DEFERRED) is False


_SITE = Path(__import__("aioquic").__file__).parent.parent


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("aioquic/tls.py", ("crypto", "certifi", "service_identity")),
        ("google/protobuf/descriptor_pool.py", ("python_message",)),
        ("google/protobuf/internal/builder.py", ("python_message",)),
    ],
)
def test_the_deferred_names_are_used_only_inside_functions(
    module: str, names: tuple[str, ...]
) -> None:
    """A module-level use would load the real module at import: the saving would be gone."""
    source = (_SITE / module).read_text()
    for line in source.splitlines():
        if line[:1] in ("", " ", "#", ")", "]", "}", '"', "'") or line.startswith(
            ("import ", "from ")
        ):
            continue
        for name in names:
            assert not re.search(rf"\b{name}\.", line), (
                f"{module}: module-level use of {name}: {line}"
            )


def test_the_lists_name_what_the_dependencies_import() -> None:
    tls = (_SITE / "aioquic/tls.py").read_text()
    assert "from OpenSSL import crypto\n" in tls
    assert "\nimport certifi\n" in tls and "\nimport service_identity\n" in tls
    for module in PROTOBUF_IMPORTS[:2]:
        text = (_SITE / (module.replace(".", "/") + ".py")).read_text()
        assert "from google.protobuf.internal import python_message" in text
