"""Redaction hides every secret without mangling the output around it: a weak password (short, or a common
word such as `postgres`) is masked only where it stands as a credential; a strong one everywhere."""

from __future__ import annotations

import re
import secrets
import uuid

import yaml

from helpers import fresh_runbook, run_cli
from liftoff.redaction import is_weak_secret, redact, redact_value, register_secret

# `postgres` is registered by these tests as a weak secret of this process: it is the user and the path too.
register_secret("postgres")
STRONG = "Kq7-" + secrets.token_urlsafe(12)
register_secret(STRONG)


def test_common_words_and_short_secrets_are_weak_long_random_ones_are_not():
    assert is_weak_secret("postgres") and is_weak_secret("Postgres") and is_weak_secret("supabase")
    assert is_weak_secret("12345678") and is_weak_secret("s3cr3t")
    assert not is_weak_secret(STRONG) and not is_weak_secret("correct-horse-battery")


def test_weak_secret_leaves_paths_user_names_and_advice_intact():
    for text in ("/usr/lib/postgresql/15/bin/pg_dump",
                 "source (127.0.0.1:5432): password authentication failed for user 'postgres'",
                 "install postgresql-client-16 (the postgres major of the target)",
                 "target postgres@127.0.0.1:5432/postgres: PostgreSQL 15.8"):
        assert redact(text) == text


def test_weak_secret_is_masked_in_credential_contexts():
    assert redact("host=db user=postgres password=postgres dbname=postgres") == \
        "host=db user=postgres password=*** dbname=postgres"
    assert redact("postgresql://postgres:postgres@db.example.com:5432/postgres") == \
        "postgresql://postgres:***@db.example.com:5432/postgres"
    assert redact("PGPASSWORD=postgres pg_dump -h db") == "PGPASSWORD=*** pg_dump -h db"
    assert redact("LIFTOFF_SOURCE_PASSWORD=postgres") == "LIFTOFF_SOURCE_PASSWORD=***"
    assert redact('{"user": "postgres", "password": "postgres"}') == '{"user": "postgres", "password": "***"}'
    assert redact("{'password': 'postgres'}") == "{'password': '***'}"
    assert redact("password: postgres") == "password: ***"
    assert redact("psql --password postgres -U postgres") == "psql --password *** -U postgres"
    assert redact("psql --password=postgres") == "psql --password=***"
    assert redact("postgres:postgres@127.0.0.1") == "postgres:***@127.0.0.1"
    assert redact_value({"user": "postgres", "password": "postgres", "rows": [{"secret_access_key": "x"}]}) == \
        {"user": "postgres", "password": "***", "rows": [{"secret_access_key": "***"}]}


def test_strong_secret_is_masked_anywhere():
    assert redact(f"connected with {STRONG} to /srv/{STRONG}/x") == "connected with *** to /srv/***/x"
    assert redact(f"password={STRONG}") == "password=***"
    assert redact_value({"note": f"({STRONG})"}) == {"note": "(***)"}


def test_wrong_weak_password_error_names_user_postgres_and_never_shows_the_password(stack):
    name = "weakpw" + uuid.uuid4().hex[:8]
    path = fresh_runbook(stack, name)
    data = yaml.safe_load(path.read_text())
    data["source"]["password"] = {"env": "LIFTOFF_WEAK_SOURCE_PW"}
    path.write_text(yaml.safe_dump(data))

    done = run_cli("run", "preflight", "--runbook", str(path), env={"LIFTOFF_WEAK_SOURCE_PW": "postgres"})
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert f"error: source (127.0.0.1:{stack.source.port}): password authentication failed for user 'postgres'; " \
           "check the secret behind source.password (env:LIFTOFF_WEAK_SOURCE_PW)" in errors, done.stderr
    output = done.stdout + done.stderr
    assert "***" not in "\n".join(errors)
    # the weak-password warning is in the preflight table, naming the field, not the value
    assert "source.password: the password is weak" in re.sub(r"\s+", " ", done.stdout)
    credential = re.compile(r"(password\s*[=:]\s*['\"]?|PGPASSWORD=|://[^:/@\s]*:|--password[= ])postgres", re.I)
    assert not credential.search(output)


def test_an_at_sign_in_a_urls_path_is_no_password():
    """Object keys like logo@2x.png: the userinfo of a URL ends at the first '/', so its path is left whole."""
    for text in ("http://127.0.0.1:9000/gallery/icons/logo@2x.png",
                 "https://files.example.com/b/a:b@c.png", "s3://bucket/x/y:z@w"):
        assert redact(text) == text
    assert redact("http://user:s3cr3t-word@host:9000/b/k@2x.png") == "http://user:***@host:9000/b/k@2x.png"
