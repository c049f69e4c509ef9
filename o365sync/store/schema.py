"""The store's tables: the SQL that creates them in a new file and upgrades a file made by an earlier version."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS emails (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    folder VARCHAR, internet_message_id VARCHAR, conversation_id VARCHAR, subject VARCHAR, body_text VARCHAR,
    from_name VARCHAR, from_address VARCHAR, received_at TIMESTAMPTZ, sent_at TIMESTAMPTZ,
    has_attachments BOOLEAN, web_link VARCHAR, imported_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS email_participants (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, name VARCHAR, address VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS email_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, graph_id VARCHAR NOT NULL,
    crm_id VARCHAR NOT NULL, crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL);
ALTER TABLE email_crm_matches ADD COLUMN IF NOT EXISTS is_primary BOOLEAN;
CREATE TABLE IF NOT EXISTS mail_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, folder VARCHAR NOT NULL,
    scan_start TIMESTAMPTZ NOT NULL, received_watermark TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL);
ALTER TABLE mail_cursor ADD COLUMN IF NOT EXISTS backfill_done BOOLEAN DEFAULT false;
ALTER TABLE mail_cursor ADD COLUMN IF NOT EXISTS delta_link VARCHAR;
ALTER TABLE mail_cursor ADD COLUMN IF NOT EXISTS delta_at TIMESTAMPTZ;
CREATE TABLE IF NOT EXISTS sync_state (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, stage VARCHAR NOT NULL,
    last_run_at TIMESTAMPTZ, last_success_at TIMESTAMPTZ, last_error VARCHAR,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    scanned BIGINT, matched BIGINT, imported BIGINT, discarded BIGINT);
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS next_retry_at TIMESTAMPTZ;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS excluded VARCHAR;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS feature VARCHAR DEFAULT 'email';
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_scanned BIGINT;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_matched BIGINT;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_imported BIGINT;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS total_discarded BIGINT;
CREATE TABLE IF NOT EXISTS crm_people (crm_id VARCHAR, kind VARCHAR, email VARCHAR, account_id VARCHAR, name VARCHAR);
CREATE TABLE IF NOT EXISTS crm_accounts (crm_id VARCHAR, name VARCHAR, domain VARCHAR);
CREATE TABLE IF NOT EXISTS crm_opportunities (
    crm_id VARCHAR, account_id VARCHAR, name VARCHAR, is_closed BOOLEAN, created_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS crm_snapshot_meta (
    taken_at TIMESTAMPTZ NOT NULL, crm_kind VARCHAR, people BIGINT, accounts BIGINT, opportunities BIGINT,
    scan_start TIMESTAMPTZ NOT NULL);
ALTER TABLE crm_snapshot_meta ADD COLUMN IF NOT EXISTS mode VARCHAR;
ALTER TABLE crm_snapshot_meta ADD COLUMN IF NOT EXISTS watermark TIMESTAMPTZ;
CREATE TABLE IF NOT EXISTS meetings (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, event_type VARCHAR,
    series_master_id VARCHAR, ical_uid VARCHAR, subject VARCHAR, start_at TIMESTAMPTZ, start_tz VARCHAR,
    end_at TIMESTAMPTZ, end_tz VARCHAR, is_all_day BOOLEAN, is_online BOOLEAN, join_url VARCHAR,
    organizer_name VARCHAR, organizer_address VARCHAR, is_internal BOOLEAN, web_link VARCHAR,
    imported_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS meeting_attendees (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, name VARCHAR, address VARCHAR NOT NULL, response VARCHAR);
CREATE TABLE IF NOT EXISTS meeting_crm_matches (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL,
    crm_id VARCHAR NOT NULL, crm_kind VARCHAR NOT NULL, matched_address VARCHAR NOT NULL, is_primary BOOLEAN);
CREATE TABLE IF NOT EXISTS calendar_cursor (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, window_start TIMESTAMPTZ NOT NULL,
    window_end TIMESTAMPTZ NOT NULL, delta_link VARCHAR, delta_at TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS notetaker_queue (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, event_id VARCHAR NOT NULL, status VARCHAR NOT NULL,
    join_url VARCHAR, link_created BOOLEAN DEFAULT false, consent_noted_at TIMESTAMPTZ, updated_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS teams_channels (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, team_id VARCHAR NOT NULL, team_name VARCHAR,
    channel_id VARCHAR NOT NULL, channel_name VARCHAR, membership_type VARCHAR, refreshed_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS shares (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR NOT NULL, share_id VARCHAR NOT NULL, target_kind VARCHAR NOT NULL,
    target_id VARCHAR NOT NULL, activity_kind VARCHAR NOT NULL, activity_id VARCHAR NOT NULL, message_id VARCHAR,
    posted_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS erased (
    tenant_id VARCHAR NOT NULL, user_oid VARCHAR, kind VARCHAR NOT NULL, key VARCHAR NOT NULL,
    erased_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS crm_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE, status VARCHAR NOT NULL, last_attempt_at TIMESTAMPTZ,
    last_success_at TIMESTAMPTZ, last_error VARCHAR);
CREATE TABLE IF NOT EXISTS crm_drop_guard (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE, refused_at TIMESTAMPTZ NOT NULL, people_removed BIGINT NOT NULL,
    people_before BIGINT NOT NULL, accounts_removed BIGINT NOT NULL, accounts_before BIGINT NOT NULL,
    confirmed_at TIMESTAMPTZ);
"""
