"""The server's shared objects, built once per app: the model, the store, the catalogue, the hot tier and the
chunk store, the planner, loader and engine of the request pipeline and the model worker, the metrics and the
ledger (accounts, licences, charges). Nothing here is global: each `create_app` builds its own."""

from __future__ import annotations

from dataclasses import dataclass

from kvmart.config import Settings
from kvmart.ledger import Ledger, open_ledger
from kvmart.reuse.catalog import Catalog
from kvmart.reuse.chunks import ChunkStore
from kvmart.runtime.model import Model
from kvmart.server.config import ServerSettings, node_name
from kvmart.server.metrics import ServerMetrics
from kvmart.server.pipeline.engine import Engine
from kvmart.server.pipeline.hot import HotTier
from kvmart.server.pipeline.plan import Loader, Planner
from kvmart.server.pipeline.worker import Worker
from kvmart.store import Store, open_store


@dataclass
class Services:
    settings: Settings
    server: ServerSettings
    model: Model
    store: Store
    catalog: Catalog
    hot: HotTier
    chunks: ChunkStore
    planner: Planner
    loader: Loader
    engine: Engine
    worker: Worker
    metrics: ServerMetrics
    ledger: Ledger
    node: str = ""  # this node's name in the ledger (server/config.py `node_name`)

    @property
    def model_id(self) -> str:
        return self.model.spec

    def start(self) -> None:
        """Start the catalogue's refresher and the model worker (the app's lifespan calls this)."""
        self.catalog.refresh()
        self.catalog.start_refresher(self.server.catalog_refresh_seconds)
        self.worker.start()

    def stop(self) -> None:
        """Drain the worker (the requests in flight are done), then stop the refresher and the chunk writer."""
        self.worker.stop()
        self.catalog.stop_refresher()
        self.engine.close()


def build_services(settings: Settings, server: ServerSettings, model: Model | None = None,
                   store: Store | None = None, ledger: Ledger | None = None) -> Services:
    """Everything the app needs; loads the model (unless given) and opens the store and the ledger named by
    `settings`."""
    ledger = ledger or open_ledger(settings.ledger, settings.data_dir)
    if model is None and server.engine == "vllm":
        from kvmart.server.pipeline.vllm import build_vllm_services  # lazily: vLLM is an optional extra

        return build_vllm_services(settings, server, store, ledger)
    model = model or Model.load(settings)
    store = store or open_store(settings.store_url, local_dir=settings.data_dir / "store")  # shared: tiered
    # several nodes over one shared store share one ledger too (--ledger postgresql://...; docs/SCALE.md "Ledger")
    catalog = Catalog(store, model.fingerprint.digest)
    hot = HotTier(server.ram_cache_bytes)
    chunks = ChunkStore(store, model.fingerprint, settings.artifact_codec)
    planner = Planner(model, catalog, hot, chunks, ledger, server, settings.chunk_tokens)
    engine = Engine(model, catalog, hot, chunks, server, settings.chunk_tokens)
    return assemble(settings, server, model, store, catalog, hot, chunks, planner, Loader(hot, chunks), engine,
                    ledger)


def assemble(settings: Settings, server: ServerSettings, model: Model, store: Store, catalog: Catalog,
             hot: HotTier, chunks: ChunkStore, planner: Planner, loader: Loader, engine: Engine, ledger: Ledger
             ) -> Services:
    """The services around an engine: its worker and the metrics that read them."""
    worker = Worker(server.max_active, server.max_queue, batch_step=engine.step, memory_bytes=server.batch_memory_bytes,
                    batching=server.batching, wake=engine.wake)

    def batches() -> dict[str, float]:
        if not engine.steps_are_forward_passes:  # vLLM batches inside itself; the worker's steps only wait for it
            return {"steps": 0, "rows": 0}
        return {"steps": engine.decode_steps, "rows": engine.decode_rows}

    def hot_values() -> dict[str, float]:
        return vars(hot.stats())

    metrics = ServerMetrics(read_active=lambda: worker.depth()[0], read_waiting=lambda: worker.depth()[1],
                            read_hot=hot_values,
                            read_documents=lambda full: len(catalog.documents(None if full else frozenset())),
                            read_forward_passes=lambda: getattr(model, "forward_passes", 0),
                            read_batches=batches)
    return Services(settings, server, model, store, catalog, hot, chunks, planner, loader, engine, worker, metrics,
                    ledger, node_name(server, settings.data_dir))
