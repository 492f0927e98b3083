"""Wrong uses of the public API: ``mypy --strict`` must report each (tests/test_typing.py)."""

from __future__ import annotations

from tasks import mint_user_tokens, unseal

count: int = mint_user_tokens.delay(["u1"]).get()  # error: a MintResult is no int
token: int = mint_user_tokens.delay(["u1"]).get()["tokens"][0]["token"]  # error: a str
mint_user_tokens.delay("u1")  # error: a list of user ids, not one id
plain: bytes = unseal("sealed")  # error: unseal gives str
