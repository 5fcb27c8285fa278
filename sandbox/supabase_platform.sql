-- What Supabase's platform puts into a project database before the app's own schema exists.
-- Run as the superuser supabase_admin in database postgres. Idempotent: safe to run twice.
-- Modelled on supabase/postgres's init scripts, cut down to what a migration has to deal with:
-- platform roles, the auth/storage/extensions schemas, a publication, an event trigger, default ACLs.

-- Roles ---------------------------------------------------------------------------------------------
-- postgres is NOT a superuser on Supabase; the Python side gives it LOGIN and a password.
do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'postgres') then
    create role postgres nologin;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'supabase_auth_admin') then
    create role supabase_auth_admin noinherit createrole login;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'supabase_storage_admin') then
    create role supabase_storage_admin noinherit createrole login;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'pgbouncer') then
    create role pgbouncer login;
  end if;
end
$$;

alter role postgres nosuperuser createdb createrole replication bypassrls;
grant anon, authenticated, service_role to authenticator;
grant anon, authenticated, service_role to postgres;
-- As on Supabase: postgres may end other roles' sessions (the cutover's write freeze does).
grant pg_signal_backend to postgres;
-- Supabase's postgres can create in public (PG15 no longer grants CREATE to PUBLIC).
grant all on schema public to postgres;
-- As on Supabase: postgres may create schemas and publications in its database (logical replication out of a
-- project: CREATE PUBLICATION needs CREATE on the database), without owning it.
grant create on database postgres to postgres;

-- extensions (the extensions themselves live in supabase_extensions.sql: they need contrib) ----------
create schema if not exists extensions;
grant usage on schema extensions to postgres, anon, authenticated, service_role;

-- auth ----------------------------------------------------------------------------------------------
create schema if not exists auth authorization supabase_auth_admin;
set role supabase_auth_admin;

-- Every column Supabase Auth's migrations give auth.users (the user's own data a migration must carry),
-- including the generated confirmed_at, which a COPY into the table must leave out.
create table if not exists auth.users (
  instance_id uuid,
  id uuid primary key,
  aud varchar(255),
  role varchar(255),
  email text unique,
  encrypted_password text,
  email_confirmed_at timestamptz,
  invited_at timestamptz,
  confirmation_token varchar(255),
  confirmation_sent_at timestamptz,
  recovery_token varchar(255),
  recovery_sent_at timestamptz,
  email_change_token_new varchar(255),
  email_change varchar(255),
  email_change_sent_at timestamptz,
  last_sign_in_at timestamptz,
  raw_app_meta_data jsonb,
  raw_user_meta_data jsonb,
  is_super_admin boolean,
  phone text unique default null,
  phone_confirmed_at timestamptz,
  phone_change text default '',
  phone_change_token varchar(255) default '',
  phone_change_sent_at timestamptz,
  confirmed_at timestamptz generated always as (least(email_confirmed_at, phone_confirmed_at)) stored,
  email_change_token_current varchar(255) default '',
  email_change_confirm_status smallint default 0
    check (email_change_confirm_status >= 0 and email_change_confirm_status <= 2),
  banned_until timestamptz,
  reauthentication_token varchar(255) default '',
  reauthentication_sent_at timestamptz,
  is_sso_user boolean not null default false,
  deleted_at timestamptz,
  created_at timestamptz default now(),
  updated_at timestamptz,
  is_anonymous boolean not null default false
);

create or replace function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

create or replace function auth.email() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text
$$;

reset role;
grant usage on schema auth to anon, authenticated, service_role;
grant execute on function auth.uid(), auth.role(), auth.jwt(), auth.email() to anon, authenticated, service_role;
grant all on schema auth to postgres;
grant all on all tables in schema auth to postgres;

-- storage -------------------------------------------------------------------------------------------
create schema if not exists storage authorization supabase_storage_admin;
set role supabase_storage_admin;

create table if not exists storage.buckets (
  id text primary key,
  name text not null unique,
  owner uuid,
  public boolean default false,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  file_size_limit bigint,
  allowed_mime_types text[]
);

create table if not exists storage.objects (
  id uuid primary key default gen_random_uuid(),
  bucket_id text references storage.buckets (id),
  name text,
  owner uuid,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  last_accessed_at timestamptz default now(),
  metadata jsonb,
  version text,
  unique (bucket_id, name)
);
-- The indexes Storage's listings seek by (storage-api migrations/tenant 0020-list-objects-with-delimiter and
-- 0051-index-backward-compatible-search): byte order for list-v2, lowercased names for the limit/offset list.
-- This cluster's default collation (C.UTF-8) is not "C" to the planner, so the unique index above serves
-- neither.
create index if not exists idx_objects_bucket_id_name on storage.objects (bucket_id, (name collate "C"));
create index if not exists idx_objects_bucket_id_name_lower on storage.objects (bucket_id, (lower(name) collate "C"));

create table if not exists storage.migrations (
  id integer primary key,
  name varchar(100) not null unique,
  hash varchar(40) not null,
  executed_at timestamp default current_timestamp
);

insert into storage.migrations (id, name, hash, executed_at) values
  (0, 'create-migrations-table', 'e18db593bcde2aca2a408c4d1100f6abba2195df', '2023-01-01 00:00:00'),
  (1, 'initialmigration', '6ab16121fbaa08bbd11b712d05f358f9b555d777', '2023-01-01 00:00:00'),
  (2, 'storage-schema', '5c7968fd083fcea04050c1b7f6253c9771b99011', '2023-01-01 00:00:00')
on conflict (id) do nothing;

reset role;
grant usage on schema storage to anon, authenticated, service_role;
grant all on schema storage to postgres;
grant all on all tables in schema storage to postgres;
-- As Storage's own migrations do: the API roles may touch every row RLS lets them see.
grant all on storage.buckets, storage.objects to anon, authenticated, service_role;
alter table storage.objects enable row level security;

-- supabase CLI migration history ---------------------------------------------------------------------
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text primary key,
  statements text[],
  name text
);
insert into supabase_migrations.schema_migrations (version, statements, name) values
  ('20240101000000', array['create table public.guides (...)'], 'initial_crm'),
  ('20240215120000', array['alter table public.bookings enable row level security'], 'bookings_rls')
on conflict (version) do nothing;

-- realtime, graphql_public: present on every project, empty here ------------------------------------
create schema if not exists realtime;
create schema if not exists graphql_public;
grant usage on schema graphql_public to anon, authenticated, service_role;

-- pgbouncer auth_query, as Supabase ships it --------------------------------------------------------
create schema if not exists pgbouncer authorization pgbouncer;
create or replace function pgbouncer.get_auth(p_usename text)
returns table (username text, password text)
language plpgsql security definer
as $$
begin
  raise debug 'PgBouncer auth request: %', p_usename;
  return query
  select usename::text, passwd::text from pg_catalog.pg_shadow where usename = p_usename;
end;
$$;
revoke all on function pgbouncer.get_auth(text) from public;
grant execute on function pgbouncer.get_auth(text) to pgbouncer;

-- realtime publication (tables are added after the app schema exists) -------------------------------
do $$
begin
  if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
end
$$;

-- event trigger: Supabase grants graphql access when pg_graphql's resolve() is created ---------------
create or replace function extensions.grant_pg_graphql_access() returns event_trigger
language plpgsql
as $$
begin
  if exists (
    select 1
    from pg_event_trigger_ddl_commands() as ev
    join pg_catalog.pg_proc as p on p.oid = ev.objid
    join pg_catalog.pg_namespace as n on n.oid = p.pronamespace
    where n.nspname = 'graphql' and p.proname = 'resolve'
  ) then
    execute 'grant usage on schema graphql to anon, authenticated, service_role';
    execute 'grant execute on function graphql.resolve to anon, authenticated, service_role';
  end if;
end;
$$;

do $$
begin
  if not exists (select 1 from pg_event_trigger where evtname = 'issue_pg_graphql_access') then
    create event trigger issue_pg_graphql_access on ddl_command_end
      when tag in ('CREATE FUNCTION')
      execute function extensions.grant_pg_graphql_access();
  end if;
end
$$;

-- public: what the API roles may do with what postgres creates ---------------------------------------
grant usage on schema public to anon, authenticated, service_role;
alter default privileges for role postgres in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges for role postgres in schema public grant all on sequences to anon, authenticated, service_role;
alter default privileges for role postgres in schema public grant all on functions to anon, authenticated, service_role;
