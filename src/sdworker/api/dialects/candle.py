"""Placeholder (being written)."""

from __future__ import annotations

from fastapi import APIRouter

from sdworker.settings import Settings


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    return APIRouter()
