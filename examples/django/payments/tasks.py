"""The project's own tasks, among them a per-user task fed by ``sfox_tokens.with_user_tokens``."""

import logging
from decimal import Decimal
from typing import Any

import sfox_tokens
from celery import shared_task
from django.db import transaction
from django.db.models import F

from payments.models import Deposit

logger = logging.getLogger(__name__)


@shared_task(name="payments.ping")
def ping() -> str:
    return "pong"


@shared_task(name="payments.deposit")
def deposit(run_tag: str, amount: str = "25.00", *, user_token: dict[str, Any]) -> str:
    """Record one deposit for the user of ``user_token`` (an entry of a mint's "tokens").

    ``user_token`` is ``{"partner_user_id", "token" (sealed), "expires"}``. The plaintext
    token is opened here, at the moment of use, and never stored or logged.
    """
    user_id = user_token["partner_user_id"]
    token = sfox_tokens.unseal(user_token["token"])
    if not token:
        raise ValueError(f"no token for {user_id}")
    # The call to sFOX for this user goes here, with the header
    # "Authorization: Bearer <token>"; this example records the deposit only.
    with transaction.atomic():
        record, created = Deposit.objects.get_or_create(
            run_tag=run_tag, user_id=user_id, defaults={"amount": Decimal(amount)}
        )
        if not created:  # delivered again: the deposit stands, the extra run is counted
            Deposit.objects.filter(pk=record.pk).update(attempts=F("attempts") + 1)
    logger.info("deposit %s for %s: %s", run_tag, user_id, "recorded" if created else "again")
    return user_id
