"""The subset of Stripe's event object that the pipeline reads. The gateway
publishes the event verbatim; consumers parse it with these models, which ignore
every field we do not use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SOURCE = "smi-pipeline"  # metadata.source on every session and payment intent we create

HANDLED_TYPES = frozenset({
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "payment_intent.payment_failed",
    "charge.refunded",
})


class StripeObject(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    object: str
    metadata: dict[str, str] = Field(default_factory=dict)
    client_reference_id: str | None = None
    payment_status: str | None = None  # checkout.session: paid | unpaid | no_payment_required
    status: str | None = None
    payment_intent: str | dict[str, Any] | None = None
    amount_total: int | None = None  # checkout.session, in cents
    amount_refunded: int | None = None  # charge
    currency: str | None = None
    customer_email: str | None = None
    customer_details: dict[str, Any] | None = None
    refunds: dict[str, Any] | None = None  # charge: {"data": [{"id": "re_...", ...}]}

    @property
    def first_refund_id(self) -> str | None:
        data = (self.refunds or {}).get("data") or []
        return data[0].get("id") if data and isinstance(data[0], dict) else None

    @property
    def payment_intent_id(self) -> str | None:
        if self.object == "payment_intent":
            return self.id
        if isinstance(self.payment_intent, dict):
            return self.payment_intent.get("id")
        return self.payment_intent

    @property
    def email(self) -> str | None:
        details = self.customer_details or {}
        return details.get("email") or self.customer_email


class StripeEventData(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    object: StripeObject


class StripeEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    type: str
    created: int
    livemode: bool = False
    data: StripeEventData

    @property
    def job_id(self) -> str | None:
        obj = self.data.object
        return obj.metadata.get("job_id") or obj.client_reference_id

    @property
    def is_ours(self) -> bool:
        return self.data.object.metadata.get("source") == SOURCE
