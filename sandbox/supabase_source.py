"""A stand-in for a Supabase project database: the platform's roles and schemas, a tour-booking CRM in
``public``, and deterministic data at any scale.

``prepare_supabase_source`` builds the schema on a fresh cluster whose initdb superuser is
``supabase_admin`` (as on Supabase); ``generate_crm`` fills it. The same ``seed`` and ``bookings`` give
byte-identical table contents on any server, so two runs can be compared with checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import unicodedata
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from liftoff_sandbox.postgres import PostgresServer

SQL_DIR = Path(__file__).parent
SUPABASE_PROJECT_URL = "https://abcdefgh.supabase.co"
PUBLIC_BUCKET = "tour-images"
PRIVATE_BUCKET = "waivers"
REALTIME_TABLES = ("public.bookings", "public.tour_schedules")
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)  # all generated timestamps are offsets from here

FIRST_NAMES = ["Zoë", "Liam", "Amélie", "Søren", "Mateo", "Aiko", "Olu", "Priya", "Björn", "Chloé", "Nguyễn",
               "Hiroshi", "Fatima", "Łukasz", "Ana", "José", "陽葵", "Noah"]
LAST_NAMES = ["Ångström", "Smith", "Müller", "García", "O'Brien", "Kowalski", "佐藤", "Dubois", "Nørgaard",
              "Silva", "Иванов", "Rossi", "Chen", "N'Diaye"]
TOUR_TITLES = ["東京 ツアー", "Fjord Kayak 🛶", "Café Crawl ☕", "Old Town Walk", "Alpine Sunrise Hike",
               "Street Food Night 🌮", "Museum Highlights", "Wine & Cheese Tasting 🍷", "Århus Harbour Bike Tour"]
TAGS = ["walking", "food", "outdoor", "family", "night", "history", "water", "wine", "photography", "accessible"]
LANGUAGES = ["en", "de", "fr", "es", "ja", "da", "it", "pt"]
COUNTRIES = ["DK", "DE", "FR", "JP", "US", "GB", "ES", "SE", None]
NOTES = ["Vegetarian 🥗", "Wheelchair user — needs step-free route", "Celebrating a birthday 🎉",
         "Arrives by ferry, may be 10 min late", "アレルギー: ナッツ"]


def prepare_supabase_source(server: PostgresServer, *, postgres_password: str, contrib: bool = True,
                            apps: bool = False) -> None:
    """Makes ``server``'s ``postgres`` database look like a Supabase project with the CRM app deployed.

    On success: the platform roles, schemas (auth, storage, extensions, supabase_migrations, realtime,
    graphql_public, pgbouncer), the ``supabase_realtime`` publication and the graphql event trigger exist;
    ``postgres`` is a LOGIN, non-superuser role with ``postgres_password`` and owns every object in
    ``public``; ``public.bookings`` and ``public.tour_schedules`` are in ``supabase_realtime``. With
    ``contrib`` the uuid-ossp and pgcrypto extensions are in ``extensions``. With ``apps`` the patterns
    real Supabase apps add are there too (``supabase_apps.sql``): RBAC with a custom access token hook,
    profiles made by a trigger on ``auth.users``, a column default calling ``auth.uid()``, a view and a
    function reading auth and storage, ``storage.objects`` policies, revoked and column-level grants,
    ``public.notes`` in ``supabase_realtime``; with ``contrib`` as well, ``public.api_keys`` whose default
    calls pgcrypto. ``server.superuser`` must be a superuser (Supabase's is ``supabase_admin``). Any SQL
    error is raised; the CRM part expects a database that does not have it yet.
    """
    with psycopg.connect(server.conninfo(), autocommit=True) as admin:
        admin.execute((SQL_DIR / "supabase_platform.sql").read_text())
        admin.execute(sql.SQL("alter role postgres with login nosuperuser password {}").format(
            sql.Literal(postgres_password)))
        if contrib:
            admin.execute((SQL_DIR / "supabase_extensions.sql").read_text())

    with psycopg.connect(server.conninfo(user="postgres", password=postgres_password), autocommit=True) as owner:
        owner.execute((SQL_DIR / "crm_schema.sql").read_text())

    with psycopg.connect(server.conninfo(), autocommit=True) as admin:
        published = {r[0] for r in admin.execute(
            "select schemaname || '.' || tablename from pg_publication_tables where pubname = 'supabase_realtime'")}
        for table in REALTIME_TABLES:
            if table not in published:
                schema, name = table.split(".")
                admin.execute(sql.SQL("alter publication supabase_realtime add table {}").format(
                    sql.Identifier(schema, name)))
        if apps:
            admin.execute((SQL_DIR / "supabase_apps.sql").read_text())
            if contrib:
                admin.execute((SQL_DIR / "supabase_apps_contrib.sql").read_text())


def storage_object_bytes(bucket_id: str, name: str) -> bytes:
    """The content of a generated Storage object. ``storage.objects.metadata`` (size, eTag = quoted MD5)
    describes exactly these bytes, so whoever uploads them to an S3 store gets matching ETags."""
    seed = f"{bucket_id}/{name}".encode()
    size = 256 + int.from_bytes(hashlib.blake2b(seed, digest_size=4).digest(), "big") % 3840
    magic = b"%PDF-1.4\n" if name.endswith(".pdf") else b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
    return (magic + hashlib.shake_128(seed).digest(size))[:size]


def generate_crm(conninfo: str, *, bookings: int, seed: int = 7) -> dict[str, int]:
    """Fills a database prepared by ``prepare_supabase_source`` with ``bookings`` bookings and everything
    scaled from it; returns the rows written per table (``{"public.bookings": n, ...}``).

    ``conninfo`` must be a superuser's (it writes auth.users and storage.objects, and loads with
    ``session_replication_role = replica`` so the audit trigger does not fire: ``booking_events`` is
    written directly). Guarantees: same ``seed`` and ``bookings`` give identical contents, uuids and
    timestamps included (uuids are hashes of (seed, kind, index), timestamps offsets from ``EPOCH``);
    every foreign key resolves; identity/serial sequences are set to the max id; tables are analyzed.
    On a source prepared with ``apps`` it also fills role_permissions, user_roles (every guide has a
    role), profiles (one per auth user, as the sign-up trigger would have made it), notes and, when the
    table exists, api_keys. Rows are generated lazily and streamed with COPY, so memory stays flat except
    for one small tuple per tour departure. Expects empty tables.
    """
    gen = _CrmGenerator(bookings=bookings, seed=seed)
    with psycopg.connect(conninfo) as conn:
        conn.execute("set session_replication_role = replica")
        gen.load_reference_data(conn)
        conn.commit()
    gen.load_bookings(conninfo)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        _update_seats_available(conn)
        _set_sequences_to_max_ids(conn)
        conn.execute("analyze")
    return dict(gen.counts)


class _CrmGenerator:
    def __init__(self, *, bookings: int, seed: int):
        self.seed = seed
        self.n_bookings = bookings
        self.n_customers = bookings // 3 + 1
        self.n_guides = bookings // 200 + 3
        self.n_tours = 20 + bookings // 500
        self.n_schedules = self.n_tours * 10
        self.counts: dict[str, int] = {}
        # Per tour and per departure (small next to bookings): the only per-row state kept in memory.
        self.tour_price_cents: dict[int, int] = {}
        self.schedules: list[tuple[int, datetime, int, int]] = []

    # deterministic identities --------------------------------------------------------------------------
    def _digest(self, kind: str, i: int) -> bytes:
        return hashlib.blake2b(f"{self.seed}:{kind}:{i}".encode(), digest_size=16).digest()

    def uuid(self, kind: str, i: int) -> uuid.UUID:
        return uuid.UUID(bytes=self._digest(kind, i), version=4)

    def person(self, kind: str, i: int) -> tuple[str, str]:
        """(full name, email) for a guide or customer, a pure function of the index."""
        h = int.from_bytes(self._digest(kind + "-name", i)[:4], "big")
        first, last = FIRST_NAMES[h % len(FIRST_NAMES)], LAST_NAMES[(h >> 8) % len(LAST_NAMES)]
        local = unicodedata.normalize("NFKD", first).encode("ascii", "ignore").decode().lower() or "guest"
        return f"{first} {last}", f"{local}.{kind}{i}@example.com"

    def customer_user_id(self, c: int) -> uuid.UUID | None:
        return self.uuid("customer-user", c) if c % 3 != 2 else None  # a third book as guests

    def rng(self, table: str) -> random.Random:
        return random.Random(f"{self.seed}:{table}")

    def _count(self, table: str, n: int = 1) -> None:
        self.counts[table] = self.counts.get(table, 0) + n

    # reference data --------------------------------------------------------------------------------------
    def load_reference_data(self, conn: psycopg.Connection) -> None:
        cur = conn.cursor()
        self._copy(cur, "auth.users", ["instance_id", "id", "aud", "role", "email", "encrypted_password",
                                        "email_confirmed_at", "last_sign_in_at", "raw_app_meta_data",
                                        "raw_user_meta_data", "created_at", "updated_at"], self._auth_users())
        self._copy(cur, "public.guides", ["id", "auth_user_id", "full_name", "email", "languages", "bio",
                                          "hourly_rate", "active", "created_at"], self._guides())
        self._copy(cur, "public.tours", ["id", "slug", "title", "description", "tags", "base_price",
                                         "duration_minutes", "max_group_size", "lead_guide_id", "meeting_point",
                                         "active", "created_at"], self._tours())
        self._copy(cur, "public.tour_schedules", ["id", "tour_id", "guide_id", "starts_at", "ends_at", "capacity",
                                                  "seats_available", "price_override"], self._tour_schedules())
        self._copy(cur, "public.customers", ["id", "user_id", "full_name", "email", "phone", "country_code",
                                             "marketing_opt_in", "preferences", "created_at"], self._customers())
        self._copy(cur, "storage.buckets", ["id", "name", "owner", "public", "created_at", "updated_at",
                                            "file_size_limit", "allowed_mime_types"], self._buckets())
        self._copy(cur, "public.tour_images", ["id", "tour_id", "position", "storage_path", "public_url",
                                               "alt_text", "width", "height"],
                   (row for row, _ in self._tour_images()))
        self._copy(cur, "storage.objects", OBJECT_COLUMNS, (obj for _, obj in self._tour_images()))
        if _table_exists(conn, "public.profiles"):
            self.load_app_data(conn)

    def _copy(self, cur: psycopg.Cursor, table: str, columns: list[str], rows: Iterator[tuple]) -> None:
        with cur.copy(_copy_statement(table, columns)) as copy:
            for row in rows:
                copy.write_row(row)
                self._count(table)

    def _users(self) -> Iterator[tuple[str, int, uuid.UUID]]:
        """(kind, index, auth user id) of every auth user: the guides, then the customers who signed up."""
        people = (("guide", g, self.uuid("guide-user", g)) for g in range(self.n_guides))
        customers = (("customer", c, self.customer_user_id(c)) for c in range(self.n_customers))
        return ((kind, i, user_id) for kind, i, user_id in itertools.chain(people, customers) if user_id is not None)

    def _auth_users(self) -> Iterator[tuple]:
        rng = self.rng("auth.users")
        for kind, i, user_id in self._users():
            name, email = self.person(kind, i)
            created = EPOCH - timedelta(days=rng.randint(30, 700), seconds=rng.randrange(86400))
            password = "$2a$10$" + hashlib.sha256(f"{self.seed}:pw:{user_id}".encode()).hexdigest()[:53]
            last_sign_in = created + timedelta(days=rng.randint(0, 400)) if rng.random() < 0.8 else None
            yield ("00000000-0000-0000-0000-000000000000", user_id, "authenticated", "authenticated", email,
                   password, created, last_sign_in, '{"provider": "email", "providers": ["email"]}',
                   json.dumps({"full_name": name, "kind": kind}, ensure_ascii=False), created,
                   last_sign_in or created)

    def _guides(self) -> Iterator[tuple]:
        rng = self.rng("guides")
        for g in range(self.n_guides):
            name, email = self.person("guide", g)
            bio = f"{name} has guided for {rng.randint(1, 25)} years 🌍" if rng.random() < 0.7 else None
            yield (g + 1, self.uuid("guide-user", g), name, email, rng.sample(LANGUAGES, rng.randint(1, 3)), bio,
                   f"{rng.randint(20, 90)}.{rng.choice(['00', '50', '75'])}", rng.random() < 0.95,
                   EPOCH - timedelta(days=rng.randint(100, 900)))

    def _tours(self) -> Iterator[tuple]:
        rng = self.rng("tours")
        for t in range(1, self.n_tours + 1):
            title = f"{TOUR_TITLES[t % len(TOUR_TITLES)]} #{t}"
            price_cents = rng.randint(1500, 25099)
            self.tour_price_cents[t] = price_cents
            meeting = {"lat": round(rng.uniform(-60, 70), 5), "lng": round(rng.uniform(-180, 180), 5),
                       "address": f"Pier {rng.randint(1, 40)}, Gate “{rng.choice('ABCDE')}”"}
            yield (t, f"tour-{t}", title, f"{title}: {rng.randint(2, 6)} hours of fun" if t % 5 else None,
                   sorted(rng.sample(TAGS, rng.randint(0, 4))), _money(price_cents),
                   rng.choice([60, 90, 120, 180, 240, 480]), rng.randint(8, 40),
                   rng.randint(1, self.n_guides) if t % 7 else None,
                   json.dumps(meeting, ensure_ascii=False), t % 13 != 0,
                   EPOCH - timedelta(days=rng.randint(10, 400)))

    def _tour_schedules(self) -> Iterator[tuple]:
        rng = self.rng("tour_schedules")
        for s in range(1, self.n_schedules + 1):
            tour_id = (s - 1) % self.n_tours + 1
            starts = EPOCH + timedelta(days=rng.randrange(730), hours=rng.choice([8, 9, 10, 14, 18, 20]))
            # unique (tour_id, starts_at): the departure's ordinal makes the minute unique per tour.
            starts += timedelta(minutes=(s - 1) // self.n_tours % 60)
            capacity = rng.randint(8, 60)
            override = rng.randint(10, 300) * 100 if rng.random() < 0.2 else None
            price_cents = override if override is not None else self.tour_price_cents[tour_id]
            self.schedules.append((tour_id, starts, capacity, price_cents))
            yield (s, tour_id, rng.randint(1, self.n_guides) if rng.random() < 0.9 else None, starts,
                   starts + timedelta(hours=rng.choice([1, 2, 3, 4, 8])), capacity, capacity,
                   _money(override) if override is not None else None)

    def _customers(self) -> Iterator[tuple]:
        rng = self.rng("customers")
        for c in range(self.n_customers):
            name, email = self.person("customer", c)
            prefs = {"newsletter": rng.random() < 0.4, "language": rng.choice(LANGUAGES)}
            if rng.random() < 0.2:
                prefs["dietary"] = rng.choice(["vegan", "halal", "kosher", "gluten-free"])
            yield (self.uuid("customer", c), self.customer_user_id(c), name, email,
                   f"+45 {rng.randrange(10**8):08d}" if rng.random() < 0.6 else None, rng.choice(COUNTRIES),
                   rng.random() < 0.3, json.dumps(prefs, sort_keys=True),
                   EPOCH - timedelta(days=rng.randint(0, 700), seconds=rng.randrange(86400)))

    def _buckets(self) -> Iterator[tuple]:
        yield (PUBLIC_BUCKET, PUBLIC_BUCKET, None, True, EPOCH - timedelta(days=900), EPOCH - timedelta(days=900),
               5_242_880, ["image/jpeg", "image/png", "image/webp"])
        yield (PRIVATE_BUCKET, PRIVATE_BUCKET, None, False, EPOCH - timedelta(days=900),
               EPOCH - timedelta(days=900), 10_485_760, ["application/pdf"])

    def _tour_images(self) -> Iterator[tuple[tuple, tuple]]:
        """(tour_images row, storage.objects row) pairs; regenerated on demand rather than kept."""
        rng = self.rng("tour_images")
        image_id = 0
        for t in range(1, self.n_tours + 1):
            for position in range(3):
                image_id += 1
                path = f"tours/{t}/{self.uuid('tour-image', image_id)}.jpg"
                created = EPOCH - timedelta(days=rng.randint(1, 300))
                image = (image_id, t, position, path, f"{SUPABASE_PROJECT_URL}/storage/v1/object/public/"
                         f"{PUBLIC_BUCKET}/{path}", f"Tour {t}, photo {position + 1} 📷" if position else None,
                         rng.choice([1200, 1600, 2048]), rng.choice([800, 1067, 1365]))
                yield image, self._object(PUBLIC_BUCKET, path, self.uuid("guide-user", t % self.n_guides),
                                          created, "image/jpeg", image_id)

    def _object(self, bucket: str, name: str, owner, created: datetime, mimetype: str, i: int) -> tuple:
        content = storage_object_bytes(bucket, name)
        metadata = {"eTag": f'"{hashlib.md5(content).hexdigest()}"', "size": len(content), "mimetype": mimetype,
                    "cacheControl": "max-age=3600", "lastModified": created.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                    "contentLength": len(content), "httpStatusCode": 200}
        return (self.uuid(f"object-{bucket}", i), bucket, name, owner, created, created, created,
                json.dumps(metadata, sort_keys=True), str(self.uuid(f"object-version-{bucket}", i)))

    # what supabase_apps.sql adds ------------------------------------------------------------------------
    def load_app_data(self, conn: psycopg.Connection) -> None:
        cur = conn.cursor()
        self._copy(cur, "public.role_permissions", ["id", "role", "permission"],
                   ((i, role, permission) for i, (role, permission) in enumerate(ROLE_PERMISSIONS, start=1)))
        self._copy(cur, "public.user_roles", ["id", "user_id", "role"],
                   ((g + 1, self.uuid("guide-user", g), "admin" if g == 0 else "guide") for g in range(self.n_guides)))
        self._copy(cur, "public.profiles", ["id", "full_name", "avatar_url", "updated_at"], self._profiles())
        self._copy(cur, "public.notes", ["id", "owner_id", "body", "created_at"], self._notes())
        if _table_exists(conn, "public.api_keys"):
            self._copy(cur, "public.api_keys", ["id", "guide_id", "label", "key_hash", "created_at"],
                       self._api_keys())

    def _profiles(self) -> Iterator[tuple]:
        """As handle_new_user() makes them at sign-up, some since edited (an avatar, an update time)."""
        rng = self.rng("profiles")
        for kind, i, user_id in self._users():
            name, _ = self.person(kind, i)
            edited = rng.random() < 0.4
            yield (user_id, name, f"https://avatars.example.com/{user_id}.png" if edited else None,
                   EPOCH - timedelta(days=rng.randint(0, 300), seconds=rng.randrange(86400)) if edited else None)

    def _notes(self) -> Iterator[tuple]:
        rng = self.rng("notes")
        for n in range(1, self.n_bookings // 10 + 2):
            owner = self.customer_user_id(rng.randrange(self.n_customers)) \
                or self.uuid("guide-user", rng.randrange(self.n_guides))
            yield (n, owner, f"{rng.choice(NOTES)} (note {n})",
                   EPOCH + timedelta(days=rng.randrange(365), seconds=rng.randrange(86400)))

    def _api_keys(self) -> Iterator[tuple]:
        rng = self.rng("api_keys")
        for g in range(self.n_guides):
            for k in range(2):
                key_id = 2 * g + k + 1
                yield (key_id, g + 1, f"partner key {k + 1} 🔑",
                       hashlib.sha256(f"{self.seed}:api-key:{key_id}".encode()).hexdigest(),
                       EPOCH - timedelta(days=rng.randint(1, 400)))

    # bookings and what hangs off them ------------------------------------------------------------------
    def load_bookings(self, conninfo: str) -> None:
        """One pass over the bookings feeding five COPY streams (one connection each), so payments,
        waivers, events and waiver objects are written next to their booking without being kept. Each
        stream commits on its own when the pass ends; a failure can leave some of them loaded."""
        streams = {
            "public.bookings": ["id", "schedule_id", "customer_id", "customer_user_id", "created_by", "status",
                                "seats", "total_amount", "currency", "notes", "metadata", "booked_at",
                                "updated_at"],
            "public.booking_events": ["id", "booking_id", "event_type", "old_status", "new_status", "payload",
                                      "occurred_at"],
            "public.payments": ["id", "booking_id", "amount_cents", "currency", "provider", "provider_ref",
                                "status", "paid_at", "raw"],
            "public.waivers": ["id", "booking_id", "customer_id", "signer_name", "signed_at", "signer_ip",
                               "document_path"],
            "storage.objects": OBJECT_COLUMNS,
        }
        with contextlib.ExitStack() as stack:
            copies = {}
            for table, columns in streams.items():
                conn = stack.enter_context(psycopg.connect(conninfo))
                conn.execute("set session_replication_role = replica")
                copies[table] = stack.enter_context(conn.cursor().copy(_copy_statement(table, columns)))
            for table, row in self._bookings():
                copies[table].write_row(row)
                self._count(table)

    def _bookings(self) -> Iterator[tuple[str, tuple]]:
        rng = self.rng("bookings")
        event_id = payment_id = 0
        for b in range(self.n_bookings):
            booking_id = self.uuid("booking", b)
            schedule = rng.randrange(self.n_schedules)
            _tour_id, starts, _capacity, price_cents = self.schedules[schedule]
            c = rng.randrange(self.n_customers)
            customer_id, user_id = self.uuid("customer", c), self.customer_user_id(c)
            seats = rng.choice((1, 1, 2, 2, 2, 3, 4, 6))
            r = rng.random()
            status = "cancelled" if r < 0.1 else "pending" if r < 0.2 else "confirmed" if r < 0.55 else "completed"
            booked_at = starts - timedelta(days=rng.randint(1, 90), seconds=rng.randrange(86400))
            updated_at = booked_at if status == "pending" else booked_at + timedelta(minutes=rng.randint(1, 4320))
            r = rng.random()
            if user_id is not None and r < 0.7:
                created_by = user_id
            elif r < 0.85:
                created_by = self.uuid("guide-user", rng.randrange(self.n_guides))
            else:
                created_by = None  # entered by staff through the service role
            total_cents = price_cents * seats
            total = _money(total_cents)
            notes = rng.choice(NOTES) if rng.random() < 0.1 else None
            metadata = json.dumps({"source": rng.choice(["web", "app", "partner", "phone"]),
                                   "utm": rng.choice(["google", "newsletter", None])}, sort_keys=True)
            yield "public.bookings", (booking_id, schedule + 1, customer_id, user_id, created_by, status, seats,
                                      total, "EUR", notes, metadata, booked_at, updated_at)

            event_id += 1
            yield "public.booking_events", (event_id, booking_id, "created", None, "pending",
                                            f'{{"seats": {seats}, "total_amount": {total}}}', booked_at)
            if status != "pending":
                event_id += 1
                yield "public.booking_events", (event_id, booking_id, "status_changed", "pending", status,
                                                json.dumps({"by": str(created_by) if created_by else None}),
                                                updated_at)

            if status in ("confirmed", "completed") or (status == "cancelled" and rng.random() < 0.5):
                payment_id += 1
                provider = rng.choice(["stripe", "stripe", "paypal"])
                yield "public.payments", (payment_id, booking_id, total_cents, "EUR", provider,
                                          f"{'pi' if provider == 'stripe' else 'PAY'}_{rng.getrandbits(96):024x}",
                                          "refunded" if status == "cancelled" else "succeeded", updated_at,
                                          json.dumps({"livemode": False, "attempt": rng.randint(1, 2)}))

            if rng.random() < 0.5:
                name, _ = self.person("customer", c)
                path = f"{customer_id}/{booking_id}.pdf"
                signed_at = booked_at + timedelta(minutes=rng.randint(1, 600))
                ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" \
                    if rng.random() < 0.8 else None
                yield "public.waivers", (self.uuid("waiver", b), booking_id, customer_id, name, signed_at, ip, path)
                yield "storage.objects", self._object(PRIVATE_BUCKET, path, user_id, signed_at, "application/pdf", b)


OBJECT_COLUMNS = ["id", "bucket_id", "name", "owner", "created_at", "updated_at", "last_accessed_at", "metadata",
                  "version"]
ROLE_PERMISSIONS = [("admin", "bookings.read"), ("admin", "bookings.delete"), ("admin", "tour_images.upload"),
                    ("guide", "bookings.read"), ("guide", "tour_images.upload")]


def _table_exists(conn: psycopg.Connection, table: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", [table]).fetchone()[0]


def _copy_statement(table: str, columns: list[str]) -> sql.Composed:
    return sql.SQL("copy {} ({}) from stdin").format(
        sql.Identifier(*table.split(".")), sql.SQL(", ").join(map(sql.Identifier, columns)))


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _update_seats_available(conn: psycopg.Connection) -> None:
    conn.execute("""
        update public.tour_schedules s
           set seats_available = greatest(s.capacity - b.booked, 0)
          from (select schedule_id, sum(seats) as booked
                  from public.bookings where status in ('pending', 'confirmed')
                 group by schedule_id) b
         where b.schedule_id = s.id""")


def _set_sequences_to_max_ids(conn: psycopg.Connection) -> None:
    """The app's own inserts would have advanced its identity/serial sequences; COPY with explicit ids
    does not, so move each to its column's max."""
    columns = conn.execute("""
        select format('%I.%I', n.nspname, c.relname), a.attname,
               pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname)
          from pg_attribute a
          join pg_class c on c.oid = a.attrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'public' and c.relkind = 'r' and a.attnum > 0 and not a.attisdropped
           and pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname) is not null""").fetchall()
    for table, column, sequence in columns:
        conn.execute(sql.SQL("select setval({}, coalesce(max({}), 1), max({}) is not null) from {}").format(
            sql.Literal(sequence), sql.Identifier(column), sql.Identifier(column), sql.SQL(table)))
