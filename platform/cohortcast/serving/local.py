"""The forecasting API in one process, without Ray Serve: the same routes, handlers and
ForecastAPI code, with the model deployment called directly. For tests (TestClient or
httpx's ASGI transport), API fuzzing and load-test smoke runs; production goes through
`build_app` and Serve."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIRouter


class _LocalMethod:
    def __init__(self, method):
        self._method = method

    def remote(self, *args, **kwargs):
        """Like a DeploymentHandle call: an awaitable of the method's result."""

        async def call():
            result = self._method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return call()


class LocalHandle:
    """Stands in for a DeploymentHandle: `handle.forecast.remote(item)` awaits
    `target.forecast(item)` in this process."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name))


def _class_routers(app: FastAPI) -> list:
    """The routers holding ForecastAPI's routes (Serve's class-based view re-mounts
    them with include_router: flat APIRoutes on older FastAPI, one nested router node
    since FastAPI 0.137)."""
    routers = [node.original_router for node in app.routes if hasattr(node, "original_router")]
    flat = [route for route in app.routes if isinstance(route, APIRoute)]
    if flat:
        router = APIRouter()
        router.routes.extend(flat)
        routers.append(router)
    return routers


def _servable_dependency(routers: list):
    """The dependency Serve's class-based view injects as `self` into every route (the
    default of the endpoint's `self` parameter)."""
    for router in routers:
        for route in router.routes:
            parameter = inspect.signature(route.endpoint).parameters.get("self")
            if parameter is not None and hasattr(parameter.default, "dependency"):
                return parameter.default.dependency
    raise RuntimeError("no class-based routes found on the app")


def local_app(
    model: Any, cfg, token: str | None = None, llm_path: str | None = None, ingest=None, cldm: Any = None
) -> FastAPI:
    """A FastAPI app serving ForecastAPI(`model`) in this process. `model`: an object
    with `info()` and `forecast(item)` (a ForecastModel, or a fake), or a handle;
    `cldm` the same for the CLDM routes (a CLDMModel), None: the service has none."""
    from cohortcast.config import IngestConfig
    from cohortcast.serving.app import ForecastAPI, app, current_api

    def handle_of(target):
        return target if hasattr(getattr(target, "info", None), "remote") else LocalHandle(target)

    handle = handle_of(model)
    # The class @serve.ingress wrapped, not the wrapper: its async __init__ (and __del__)
    # need a Serve replica.
    routes_class = next(c for c in ForecastAPI.__mro__ if "healthz" in c.__dict__)
    instance = routes_class(handle, cfg, token, llm_path, ingest or IngestConfig(), handle_of(cldm) if cldm else None)
    local = FastAPI(
        title=app.title, version=app.version, description=app.description, redirect_slashes=app.router.redirect_slashes
    )
    routers = _class_routers(app)
    for router in routers:
        local.include_router(router)
    for kind, handler in app.exception_handlers.items():
        local.add_exception_handler(kind, handler)
    # Serve's `self` and the auth dependency's ForecastAPI: both this instance.
    local.dependency_overrides[_servable_dependency(routers)] = lambda: instance
    local.dependency_overrides[current_api] = lambda: instance
    local.state.api = instance
    return local
