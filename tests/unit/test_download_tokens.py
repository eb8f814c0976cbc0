"""Raw download tokens (smi/jobtable/table.new_download_token): the shape the
gateway accepts, and no bias among the 62 characters."""

from __future__ import annotations

from collections import Counter

from smi.jobtable.table import TOKEN_ALPHABET, TOKEN_LENGTH, is_well_formed_token, new_download_token


def test_tokens_are_well_formed_and_distinct():
    tokens = [new_download_token() for _ in range(2000)]
    assert all(is_well_formed_token(t) and len(t) == TOKEN_LENGTH for t in tokens)
    assert len(set(tokens)) == len(tokens)


def test_every_character_is_equally_likely():
    # 640,000 characters: about 10,323 of each, with a standard deviation near 100.
    # A bound of 10% is ten deviations (never hit by chance) and still catches the
    # usual mistake, bytes taken mod 62 without dropping 248..255, which makes the
    # first eight characters 25% more frequent.
    counts = Counter("".join(new_download_token() for _ in range(10_000)))
    expected = 10_000 * TOKEN_LENGTH / len(TOKEN_ALPHABET)
    assert set(counts) == set(TOKEN_ALPHABET)
    assert all(abs(n - expected) < 0.1 * expected for n in counts.values()), counts.most_common(3)
