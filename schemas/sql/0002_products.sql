-- Normalized write model of the Product aggregate.
CREATE TABLE products (
    id          uuid        PRIMARY KEY,
    sku         text        NOT NULL,
    name        text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    category    text        NOT NULL,
    price_cents bigint      NOT NULL CHECK (price_cents >= 0),
    currency    char(3)     NOT NULL,
    stock       bigint      NOT NULL CHECK (stock >= 0),
    status      text        NOT NULL CHECK (status IN ('active', 'discontinued')),
    units_sold  bigint      NOT NULL DEFAULT 0 CHECK (units_sold >= 0),
    version     bigint      NOT NULL CHECK (version >= 1),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    CONSTRAINT products_sku_key UNIQUE (sku)
);
