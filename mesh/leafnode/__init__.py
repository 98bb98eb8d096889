"""Leaf-node topology: an on-prem site runs its own nats-server as a **leaf node** of the cloud
hub, with its own JetStream domain, so edge agents keep publishing while the WAN is down.

Topology (DESIGN §4, "Hybrid")::

    site "edge"                                          cloud
    ERP ─► edge agent ─► leaf nats-server ══ WAN ══► hub nats-server ─► cloud agents ─► CRM
                         JetStream domain "edge"         JetStream domain "hub"
                         MESH_EVENTS (evt.>)             MESH_EVENTS (evt.>)
                                        └──── sourced via $JS.edge.API ───┘

Data path (how an event crosses):

1. Edge agents connect to the **leaf** only (``[nats] servers = ["nats://127.0.0.1:4222"]``) and
   run as usual: ``ensure_streams`` and their publishes go to the leaf's own JetStream. On a leaf
   node with its own domain, ``$JS.API.>`` is served locally and never crosses the link, so the
   agents need no domain setting. Their outbox drains into the leaf whether or not the WAN is up.
2. The hub's ``MESH_EVENTS`` (domain ``hub``) **sources** the leaf's ``MESH_EVENTS`` through
   the external API prefix ``$JS.<edge domain>.API`` (:func:`ensure_edge_sourcing`, once, by the
   operator: ``meshctl leafnode link``). The hub runs the source consumer itself and remembers the
   last edge sequence it stored, so after an outage it catches up by itself, in the edge stream's
   order. Sourced messages keep their subject and their ``Nats-Msg-Id`` (the envelope id), so
   the hub stream deduplicates them inside its duplicate window and sinks' inboxes beyond it.
   nats-server retries a failed source only after 10 s, 20 s, ... up to 2 min, so after a long
   outage catch-up could start minutes late: ``meshctl leafnode link --watch`` on the hub side
   (:func:`watch_edge_sourcing`) restarts a stalled source as soon as the site's stream answers
   again (the server resumes after the last edge sequence it stored: no gap, no copy) and puts
   the source back if something replaced the stream config. Agents' ``ensure_streams`` keeps
   a stream's sources when it updates the stream.
3. Cloud sink agents connect to the hub and consume from the hub's ``MESH_EVENTS`` as usual.
4. Trace records (:mod:`mesh.trace`) take the same way: ``link`` also makes the hub's
   ``MESH_TRACE`` source the leaf's ``MESH_TRACE`` (all of :data:`EDGE_STREAMS`; ``--watch``
   keeps each source prompt; ``unlink`` removes them), so ``meshctl trace`` and the control
   plane's transaction index at the hub see what happened on site (capture, publish, applies of
   cloud changes, dead letters) next to the cloud's steps, once the link has carried them.
   Sourced records keep their subject ``trace.<agent>.<kind>`` and their ``Nats-Msg-Id``: the
   source resumes after the last record it stored, so none is stored twice. The check that a
   record names the agent of its subject still holds: the leaf's server, which runs the same
   operator and permission table, let only that agent publish there. Agents on both sides must
   therefore have distinct names (the registry gives each one its own creds anyway).

Dead letters stay on site: the hub does **not** source the leaf's ``MESH_DLQ``. A replay
republishes into the ``MESH_EVENTS`` of the server it runs against; at the hub that would put a
site's failed apply (or capture) into the cloud's stream instead of back to the site's sink, and
a purge at the hub would not purge the site. ``meshctl dlq list`` at the hub instead names each
linked site and how many dead letters its own ``MESH_DLQ`` holds (:func:`edge_dead_letters`,
asked through ``$JS.<edge>.API``), and the hub's trace shows the ``dead_lettered`` records.

Why not let the subjects cross the link: verified with nats-server 2.15, two streams in
different JetStream domains that listen on the same subjects (``evt.>`` on both sides) do
**collide** across a leaf connection: core NATS interest crosses the link, so a publish on the leaf
is stored in *both* streams while the link is up (and the PubAck may even come from the hub), and
hub-side publishes land on the leaf too. The leaf's remote therefore denies the mesh's stream
subject spaces (:data:`MESH_SUBJECTS`) in both directions (``deny_imports``/``deny_exports``);
events reach the hub only through sourcing, which uses ``$JS.*`` subjects. Each domain keeps the
standard subject layout, so agents are configured the same on both sides. A mirror was not
chosen because a mirror cannot also take the hub's own publishes, and one hub stream can source
from many sites (one source per edge domain). The hub's leafnodes block sets ``advertise`` to the
address the sites dial, since leaf nodes fail over to the URLs the hub advertises.

Limits: the leaf keeps events for ``streams.max_age`` (7 days by default); an outage longer than
that, or one that fills the leaf's disk, loses what expired before the hub sourced it. The
generated leaf config fsyncs every write (``sync_interval: always``) because during an outage
the leaf's store is the only copy of what the agents' outboxes already deleted.

Other direction (cloud → site, e.g. CRM changes applied on site): call
:func:`ensure_domain_source` on the *leaf* with ``domain="hub"`` and a ``filter_subject`` that
selects only cloud origins (``evt.*.*.crm``). Never source ``evt.>`` both ways: events would loop.
"""

from mesh.leafnode.config import (
    DEFAULT_HUB_DOMAIN,
    LEAF_PORT,
    MESH_SUBJECTS,
    LeafnodeFiles,
    LeafnodePlan,
    check_nats_config,
    make_plan,
    render_agent_nats,
    render_hub_conf,
    render_instructions,
    render_leaf_conf,
    write_leafnode_files,
)
from mesh.leafnode.sourcing import (
    EDGE_STREAMS,
    SourceStatus,
    api_prefix,
    domain_stream_messages,
    edge_dead_letters,
    edge_source_status,
    edge_stream_ready,
    ensure_domain_source,
    ensure_edge_sourcing,
    linked_domains,
    remove_domain_source,
    remove_edge_sourcing,
    restart_domain_source,
    watch_edge_sourcing,
)

__all__ = [
    "DEFAULT_HUB_DOMAIN",
    "EDGE_STREAMS",
    "LEAF_PORT",
    "MESH_SUBJECTS",
    "LeafnodeFiles",
    "LeafnodePlan",
    "SourceStatus",
    "api_prefix",
    "check_nats_config",
    "domain_stream_messages",
    "edge_dead_letters",
    "edge_source_status",
    "edge_stream_ready",
    "ensure_domain_source",
    "ensure_edge_sourcing",
    "linked_domains",
    "make_plan",
    "remove_domain_source",
    "remove_edge_sourcing",
    "render_agent_nats",
    "render_hub_conf",
    "render_instructions",
    "render_leaf_conf",
    "restart_domain_source",
    "watch_edge_sourcing",
    "write_leafnode_files",
]
