"""Argon2id with the parameters safereset uses, for a like-for-like comparison."""

from __future__ import annotations

import dataclasses

from django.contrib.auth.hashers import Argon2PasswordHasher

HASH_LENGTH_BYTES = 32


class RFC9106LowMemoryArgon2PasswordHasher(Argon2PasswordHasher):
    """Argon2id with RFC 9106's second recommended option (t=3, 64 MiB, p=4).

    Django 5.2's own Argon2PasswordHasher uses t=2, 100 MiB and p=8. The
    algorithm name stays "argon2", so the stored hashes read
    ``argon2$argon2id$v=19$m=65536,t=3,p=4$...`` and Django's stock hasher
    could verify them as well.

    The salt cannot be set to 16 bytes: Django passes its own salt, 22
    random alphanumeric characters (about 131 bits), and Argon2 takes those
    22 ASCII bytes as the salt. A shorter salt would make ``must_update``
    report every hash as outdated, so each login would hash and save again.
    """

    time_cost = 3
    memory_cost = 65536  # KiB
    parallelism = 4

    def params(self):
        # Django takes the tag length from argon2-cffi's default, 32 bytes in
        # argon2-cffi 25.1. Setting it here keeps it at 32 in other releases.
        return dataclasses.replace(super().params(), hash_len=HASH_LENGTH_BYTES)
