-- Extensions every Supabase project has, in the extensions schema. Needs PostgreSQL contrib.
-- Run as supabase_admin after supabase_platform.sql. Idempotent.
create extension if not exists "uuid-ossp" with schema extensions;
create extension if not exists pgcrypto with schema extensions;
