"""Initial schema: configuration objects, revision counter, message tracking.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "config_object",
        sa.Column("guid", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("name_key", sa.String(400), nullable=False),
        sa.Column("server", sa.String(64), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("kind", "name_key", name="uq_config_object_kind_name"),
    )
    op.create_table(
        "config_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(sa.table("config_revision", sa.column("id", sa.Integer), sa.column("revision", sa.BigInteger)),
                   [{"id": 1, "revision": 0}])
    op.create_table(
        "message_tracking",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("timestamp", sa.DateTime, nullable=False),
        sa.Column("server", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("internal_message_id", sa.BigInteger, nullable=True),
        sa.Column("message_id", sa.Text, nullable=True),
        sa.Column("network_message_id", sa.String(36), nullable=True),
        sa.Column("sender", sa.Text, nullable=True),
        sa.Column("recipients", sa.Text, nullable=True),
        sa.Column("recipient_status", sa.Text, nullable=True),
        sa.Column("total_bytes", sa.BigInteger, nullable=True),
        sa.Column("recipient_count", sa.Integer, nullable=True),
        sa.Column("related_recipient_address", sa.Text, nullable=True),
        sa.Column("reference", sa.Text, nullable=True),
        sa.Column("message_subject", sa.Text, nullable=True),
        sa.Column("return_path", sa.Text, nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("client_hostname", sa.Text, nullable=True),
        sa.Column("server_ip", sa.String(64), nullable=True),
        sa.Column("server_hostname", sa.Text, nullable=True),
        sa.Column("source_context", sa.Text, nullable=True),
        sa.Column("connector_id", sa.Text, nullable=True),
        sa.Column("message_info", sa.Text, nullable=True),
        sa.Column("directionality", sa.String(16), nullable=True),
        sa.Column("tenant_id", sa.String(64), nullable=True),
        sa.Column("original_client_ip", sa.String(64), nullable=True),
        sa.Column("original_server_ip", sa.String(64), nullable=True),
        sa.Column("custom_data", sa.Text, nullable=True),
        sa.Column("transport_traffic_type", sa.String(32), nullable=True),
        sa.Column("message_latency", sa.Float, nullable=True),
    )
    op.create_index("ix_message_tracking_timestamp", "message_tracking", ["timestamp"])
    op.create_index("ix_message_tracking_internal_id", "message_tracking", ["server", "internal_message_id"])
    op.create_index("ix_message_tracking_network_id", "message_tracking", ["network_message_id"])
    op.create_table(
        "message_tracking_recipient",
        sa.Column("tracking_id", sa.BigInteger, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
    )
    op.create_index("ix_message_tracking_recipient_tracking_id", "message_tracking_recipient", ["tracking_id"])
    op.create_index("ix_message_tracking_recipient_address", "message_tracking_recipient", ["address"])


def downgrade() -> None:
    op.drop_table("message_tracking_recipient")
    op.drop_table("message_tracking")
    op.drop_table("config_revision")
    op.drop_table("config_object")
