"""Jinja filters that say values the way a person on the phone says them: dates, times, money, phone
numbers and lists, for role-prompt templates."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

import jinja2

log = logging.getLogger(__name__)

_CURRENCY_SYMBOLS = {"USD": "$"}
_CURRENCY_WORDS = {"EUR": "euros", "GBP": "pounds", "CAD": "Canadian dollars", "AUD": "Australian dollars"}


# ----------------------------------------------------------------------------------------------------
# Filters: values spoken the way a person on the phone says them.


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _as_date(value: Any) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip()).date()
        except ValueError:
            return None
    return None


@jinja2.pass_context
def spoken_date(context: Any, value: Any, weekday: bool = False) -> str:
    """2026-04-12 -> "April 12th" ("Sunday, April 12th" with weekday); the year only when it is not this
    year's. Text that is not an ISO date is kept as it is (a CRM may already say "next Tuesday")."""
    day = _as_date(value)
    if day is None:
        return str(value)
    text = f"{day:%B} {_ordinal(day.day)}"
    now = context.get("now")
    if not isinstance(now, date) or now.year != day.year:
        text += f", {day.year}"
    return f"{day:%A}, {text}" if weekday else text


def spoken_time(value: Any) -> str:
    """14:30 -> "2:30 PM", 09:00 -> "9 AM"; text that is not a time of day is kept as it is."""
    if isinstance(value, datetime):
        moment: time | None = value.time()
    elif isinstance(value, time):
        moment = value
    elif isinstance(value, str):
        try:
            moment = time.fromisoformat(value.strip())
        except ValueError:
            moment = None
    else:
        moment = None
    if moment is None:
        return str(value)
    hour = moment.hour % 12 or 12
    half = "AM" if moment.hour < 12 else "PM"
    return f"{hour} {half}" if moment.minute == 0 else f"{hour}:{moment.minute:02d} {half}"


def money(value: Any, currency: str = "USD") -> str:
    """89 -> "$89", 1234.5 -> "$1,234.50", ("12", "EUR") -> "12 euros"; text that is not an amount is kept."""
    try:
        text = str(value).strip().replace(",", "").lstrip("$€£")
        amount = Decimal(text)
    except (InvalidOperation, ValueError):
        return str(value)
    if not amount.is_finite():
        return str(value)
    sign = "minus " if amount < 0 else ""
    amount = abs(amount)
    digits = f"{amount:,.0f}" if amount == amount.to_integral_value() else f"{amount:,.2f}"
    code = currency.upper()
    if code in _CURRENCY_SYMBOLS:
        return f"{sign}{_CURRENCY_SYMBOLS[code]}{digits}"
    return f"{sign}{digits} {_CURRENCY_WORDS.get(code, code)}"


def phone(value: Any, last: int | None = None) -> str:
    """+15551230000 -> "555 123 0000" (North American numbers lose the +1), other numbers in groups of three;
    `last=4` gives only the last four digits, for "the number ending in ...". Text without digits is kept."""
    digits = "".join(ch for ch in str(value) if ch.isdigit())
    if not digits:
        return str(value)
    if last is not None:
        return " ".join(digits[-last:])
    if len(digits) == 11 and digits.startswith("1"):
        digits = digits[1:]
    if len(digits) == 10:
        return f"{digits[:3]} {digits[3:6]} {digits[6:]}"
    return " ".join(digits[i : i + 3] for i in range(0, len(digits), 3))


def spoken_list(items: Any, conjunction: str = "and") -> str:
    """["gutters", "roof", "windows"] -> "gutters, roof and windows"."""
    if isinstance(items, str) or not isinstance(items, Iterable):
        return str(items)
    words = [str(item) for item in items if item not in (None, "")]
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


FILTERS: dict[str, Callable[..., str]] = {
    "spoken_date": spoken_date,
    "spoken_time": spoken_time,
    "money": money,
    "phone": phone,
    "spoken_list": spoken_list,
}
