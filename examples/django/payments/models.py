from django.db import models


class Deposit(models.Model):
    """One ACH deposit per user and run: the unique constraint keeps a redelivery harmless.

    No token is stored: a user's token is opened at the moment of use and then dropped.
    """

    run_tag = models.CharField(max_length=64)
    user_id = models.CharField(max_length=256)
    amount = models.DecimalField(max_digits=18, decimal_places=2)
    #: How many times the task ran for this user and run (a redelivery adds one).
    attempts = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [  # noqa: RUF012 (Django reads Meta options as class attributes)
            models.UniqueConstraint(fields=["run_tag", "user_id"], name="one_deposit_per_user_run")
        ]

    def __str__(self) -> str:
        return f"{self.run_tag}: {self.user_id} {self.amount}"
