"""The first admin key of a fresh deployment, from a secret file (a Docker or Kubernetes secret).

A container answers 401 until a key exists. Instead of creating one inside it, the operator
writes a secret (`subjective keys new-secret`) into a file the server reads at start-up
(`--admin-key-file`, or SUBJECTIVE_ADMIN_KEY_FILE). The key is stored hashed like every other
key, once: later starts leave it alone, so revoking it with `subjective keys revoke` sticks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from subjective.server.keys import ApiKey, KeyStore

BOOTSTRAP_KEY_NAME = "bootstrap-admin"
log = logging.getLogger(__name__)


def adopt_admin_key_file(store: KeyStore, path: Path) -> ApiKey | None:
    """Store the admin key whose secret `path` holds, unless its id is already known.

    Raises ValueError when the file does not hold a well-formed secret: better to refuse
    to start than to serve with no way in."""
    try:
        secret = path.read_text().strip()
        key = store.adopt(secret, BOOTSTRAP_KEY_NAME, admin=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"admin key file {path}: {error}") from error
    if key is not None:
        log.info("stored the bootstrap admin key %s from %s", key.id, path)
    return key
