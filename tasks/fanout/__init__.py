"""The fan-out: ``with_user_tokens``, minting for many users and calling a downstream per user."""
