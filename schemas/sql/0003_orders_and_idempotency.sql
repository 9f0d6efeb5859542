-- Normalized write model of the Order aggregate, and stored command responses for
-- Idempotency-Key.

CREATE TABLE orders (
    id           uuid        PRIMARY KEY,
    customer_id  uuid        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('placed', 'cancelled')),
    total_cents  bigint      NOT NULL CHECK (total_cents >= 0),
    currency     char(3)     NOT NULL,
    version      bigint      NOT NULL CHECK (version >= 1),
    placed_at    timestamptz NOT NULL,
    cancelled_at timestamptz
);
CREATE INDEX orders_customer_idx ON orders (customer_id, placed_at DESC, id);

-- Unit price, name and sku are captured at order time.
CREATE TABLE order_lines (
    order_id         uuid   NOT NULL REFERENCES orders (id),
    line_no          int    NOT NULL CHECK (line_no >= 1),
    product_id       uuid   NOT NULL REFERENCES products (id),
    sku              text   NOT NULL,
    name             text   NOT NULL,
    unit_price_cents bigint NOT NULL CHECK (unit_price_cents >= 0),
    quantity         bigint NOT NULL CHECK (quantity >= 1),
    line_total_cents bigint NOT NULL CHECK (line_total_cents >= 0),
    PRIMARY KEY (order_id, line_no),
    CONSTRAINT order_lines_product_key UNIQUE (order_id, product_id)
);

-- One row per (caller + method + path, key). Written in the same transaction as the command's
-- change, with the final response (2xx or business 4xx). Rows expire after the retention
-- (CQRS_IDEMPOTENCY_TTL_S) and are deleted by the relay leader in small batches.
CREATE TABLE idempotency_keys (
    scope        text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    status       int,
    headers      jsonb,
    body         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_expiry_idx ON idempotency_keys (expires_at);
