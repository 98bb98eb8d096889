-- The ERP's inbound interface for sales orders from the CRM (run.py runs it once, after loading
-- Northwind). The mesh's PostgreSQL sink writes one row per order, its lines as jsonb, into
-- crm_order_import: one transaction per batch, under its version guard. The trigger below turns
-- each row into a Northwind order (orders + order_details) inside that same transaction, so an
-- order and its lines land together or not at all, and a redelivered event changes nothing.

CREATE SEQUENCE erp_order_number START 20001 MAXVALUE 32767;  -- orders.order_id is smallint

CREATE TABLE crm_order_import (
    deal_id       text PRIMARY KEY,             -- the sink's key: the CRM deal (canonical id)
    order_id      smallint UNIQUE,              -- the ERP's own order number, assigned on insert
    customer_id   varchar(5) NOT NULL,
    order_date    date NOT NULL,
    required_date date,
    reference     text,
    lines         jsonb NOT NULL,               -- [{product_id, quantity, unit_price, discount}]
    imported_at   timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION crm_order_number() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.order_id := nextval('erp_order_number');
    RETURN NEW;
END $$;

CREATE TRIGGER crm_order_number BEFORE INSERT ON crm_order_import
    FOR EACH ROW EXECUTE FUNCTION crm_order_number();

CREATE FUNCTION crm_order_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN                  -- the deal was lost after all: cancel the order
        DELETE FROM order_details WHERE order_id = OLD.order_id;
        DELETE FROM orders WHERE order_id = OLD.order_id;
        RETURN OLD;
    END IF;
    -- Ship to the customer's address. An unknown customer or product violates Northwind's
    -- foreign keys: the sink refuses that record alone (it is dead-lettered with the reason).
    INSERT INTO orders (order_id, customer_id, order_date, required_date, ship_name, ship_address,
                        ship_city, ship_region, ship_postal_code, ship_country)
    SELECT NEW.order_id, NEW.customer_id, NEW.order_date, NEW.required_date, c.company_name,
           c.address, c.city, c.region, c.postal_code, c.country
      FROM (SELECT 1) AS one LEFT JOIN customers c ON c.customer_id = NEW.customer_id
    ON CONFLICT (order_id) DO UPDATE
       SET customer_id = EXCLUDED.customer_id, order_date = EXCLUDED.order_date,
           required_date = EXCLUDED.required_date, ship_name = EXCLUDED.ship_name,
           ship_address = EXCLUDED.ship_address, ship_city = EXCLUDED.ship_city,
           ship_region = EXCLUDED.ship_region, ship_postal_code = EXCLUDED.ship_postal_code,
           ship_country = EXCLUDED.ship_country;
    DELETE FROM order_details WHERE order_id = NEW.order_id;
    INSERT INTO order_details (order_id, product_id, unit_price, quantity, discount)
    SELECT NEW.order_id, l.product_id, l.unit_price, l.quantity, l.discount
      FROM jsonb_to_recordset(NEW.lines)
           AS l(product_id smallint, unit_price numeric, quantity smallint, discount numeric);
    RETURN NEW;
END $$;

CREATE TRIGGER crm_order_apply AFTER INSERT OR UPDATE OR DELETE ON crm_order_import
    FOR EACH ROW EXECUTE FUNCTION crm_order_apply();
