from __future__ import annotations

from typing import Any

from django import forms


class EmailForm(forms.Form):
    email = forms.EmailField(label="Email", max_length=254)


class CodeForm(forms.Form):
    email = forms.EmailField(label="Email", max_length=254)
    code = forms.CharField(
        label="Code",
        max_length=64,
        widget=forms.TextInput(
            attrs={"autocomplete": "one-time-code", "inputmode": "numeric", "autofocus": True}
        ),
    )


class NewPasswordForm(forms.Form):
    password1 = forms.CharField(
        label="New password", strip=False, widget=forms.PasswordInput(attrs={"autofocus": True})
    )
    password2 = forms.CharField(label="Again", strip=False, widget=forms.PasswordInput)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("password1") != data.get("password2"):
            raise forms.ValidationError("The two passwords differ.")
        return data


class SendForm(forms.Form):
    DELIVERY = [
        ("now", "Now: the request waits while robust_mail tries the providers"),
        ("background", "In the background: into the outbox, the worker sends it"),
    ]

    to = forms.EmailField(label="To", max_length=254, initial="someone@example.com")
    subject = forms.CharField(max_length=200, initial="Hello from robust_mail")
    body = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        initial="This message went through robust_mail.",
    )
    delivery = forms.ChoiceField(choices=DELIVERY, initial="now", widget=forms.RadioSelect)
